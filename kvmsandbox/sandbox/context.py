"""What the parts of the sandbox layer share: the config, the hypervisor backend and what was chosen
from its capabilities, the guest image, the record store, one agent client per sandbox, the
containers' output streams and a lock per sandbox."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from kvmsandbox.agent.client import AgentClient, serial_connector, vsock_connector
from kvmsandbox.config import Config
from kvmsandbox.errors import FailedPrecondition
from kvmsandbox.guest_image import GuestImage
from kvmsandbox.host.cgroupfs import cgroups_available
from kvmsandbox.hypervisor.accel import Accel, detect_accel
from kvmsandbox.hypervisor.capabilities import choose_shared_filesystem, choose_transport
from kvmsandbox.hypervisor.spec import Hypervisor
from kvmsandbox.network.pod import PodNetworking
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.states import SandboxState
from kvmsandbox.sandbox.stdio import StdioRegistry
from kvmsandbox.sandbox.store import SandboxStore
from kvmsandbox.sandbox.types import BootTimings

log = logging.getLogger(__name__)


class SandboxContext:
    """Shared by boot, lifecycle, containers, exec, recovery and probes; owns no sandbox itself."""

    def __init__(self, config: Config, hypervisor: Hypervisor, image: GuestImage) -> None:
        """Raises FailedPrecondition when the backend offers nothing the runtime can use."""
        self.config = config
        self.hypervisor = hypervisor
        self.image = image
        self.store = SandboxStore(config.state_dir)
        accel = config.hypervisor.accel
        self.accel: Accel
        self.accel, self.accel_reason = (accel, "set in config") if accel != "auto" else detect_accel()
        self.transport = choose_transport(config.agent.transport, hypervisor.capabilities)
        self.shared_fs = choose_shared_filesystem(hypervisor.capabilities)
        self.networking = PodNetworking(config)
        self.cgroups_ok, self.cgroups_reason = cgroups_available()
        if not self.cgroups_ok:
            log.warning("VMMs are not placed in host cgroups: %s", self.cgroups_reason)
        self.stdio = StdioRegistry(config.sandbox.output_bytes_per_second)
        self.boot_timings: dict[str, BootTimings] = {}
        # Called (sandbox id, why) when an agent breaks the protocol; the manager marks it BROKEN.
        self.on_agent_violation: Callable[[str, str], None] = lambda sandbox_id, reason: None
        self._lock = threading.Lock()
        self._sandbox_locks: dict[str, threading.RLock] = {}
        self._clients: dict[str, AgentClient] = {}

    # -- paths -------------------------------------------------------------------------------

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.store.dir(sandbox_id)

    def run_dir(self, sandbox_id: str) -> Path:
        # Unix socket paths are limited to 108 bytes: a short, fixed-length name.
        return self.config.run_dir / hashlib.sha256(sandbox_id.encode()).hexdigest()[:16]

    def console_log(self, sandbox_id: str) -> Path:
        return self.sandbox_dir(sandbox_id) / "console.log"

    def log_positions(self, sandbox_id: str, container_id: str) -> Path:
        """Where the container's log stands in its output (see logs.LogPositions)."""
        return self.sandbox_dir(sandbox_id) / "log-positions" / container_id

    # -- locks and clients -------------------------------------------------------------------

    def lock_for(self, sandbox_id: str, *, creating: bool = False) -> threading.RLock:
        """The lock that serializes work on one sandbox. Kept only for sandboxes that exist (or are
        being created): an unknown id from a request gets a lock of its own, so no request can
        make the runtime keep one (with its id) forever."""
        with self._lock:
            lock = self._sandbox_locks.get(sandbox_id)
            if lock is None:
                lock = threading.RLock()
                if creating or self.store.exists(sandbox_id):
                    self._sandbox_locks[sandbox_id] = lock
            return lock

    def forget_lock(self, sandbox_id: str) -> None:
        """The sandbox is gone: its lock goes too."""
        with self._lock:
            self._sandbox_locks.pop(sandbox_id, None)

    def client_for(self, record: SandboxRecord) -> AgentClient:
        """The sandbox's agent client, made on first use (whatever the sandbox's state)."""
        with self._lock:
            client = self._clients.get(record.id)
            if client is None:
                connector = (
                    vsock_connector(record.guest_cid)
                    if record.transport == "vsock"
                    else serial_connector(Path(record.agent_socket))
                )
                sandbox_id = record.id
                client = AgentClient(
                    connector,
                    f"sandbox {record.id}",
                    default_timeout=self.config.agent.call_timeout_seconds,
                    on_violation=lambda reason: self.on_agent_violation(sandbox_id, reason),
                )
                self._clients[record.id] = client
            return client

    def ready_client(self, record: SandboxRecord) -> AgentClient:
        """The agent client of a READY sandbox.

        Raises:
            FailedPrecondition: the sandbox is not ready (booting, broken or stopped).
        """
        if record.state is not SandboxState.READY:
            why = f" ({record.broken_reason})" if record.broken_reason else ""
            raise FailedPrecondition(f"sandbox {record.id} is {record.state.value}{why}, not ready")
        return self.client_for(record)

    def drop_client(self, sandbox_id: str) -> None:
        with self._lock:
            client = self._clients.pop(sandbox_id, None)
        if client is not None:
            client.close()

    def drop_all_clients(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

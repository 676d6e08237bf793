"""The sandbox layer's one entry point: sandboxes (one VM each) and the containers inside them.
Each method is a thin call into the module that does the work: ``boot`` (create), ``lifecycle``
(stop, remove), ``containers``, ``execs``, ``recovery``, ``probes``; ``context`` holds what they
share."""

from __future__ import annotations

import logging
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from kvmsandbox.agent.client import AgentClient, ExitStatus
from kvmsandbox.agent.streams import PortStream, RelayStream
from kvmsandbox.config import Config
from kvmsandbox.errors import AgentError, FailedPrecondition, NotFound
from kvmsandbox.guest_image import GuestImage
from kvmsandbox.hypervisor.accel import Accel
from kvmsandbox.hypervisor.spec import Hypervisor
from kvmsandbox.network.pod import PodNetworking
from kvmsandbox.sandbox import containers, execs, interactive, lifecycle, probes, recovery
from kvmsandbox.sandbox.boot import SandboxBoot
from kvmsandbox.sandbox.console import ConsoleSweeper, SweepResult
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.interactive import ProcessIO
from kvmsandbox.sandbox.oci_spec import Isolation, ProcessSpec
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord, check_id
from kvmsandbox.sandbox.states import SandboxState
from kvmsandbox.sandbox.stdio import STDIO_POLL_SECONDS
from kvmsandbox.sandbox.templates import Templates
from kvmsandbox.sandbox.types import (
    BootTimings,
    ContainerStats,
    DnsConfig,
    ExecResult,
    FilesystemUsage,
    HostMount,
    NetworkRequest,
    PodKernel,
    VmUsage,
)
from kvmsandbox.sandbox.warm_pool import WarmPool

log = logging.getLogger(__name__)


class SandboxManager:
    """Creates and destroys sandboxes and runs containers in them.

    Methods raise the classes of ``kvmsandbox.errors``: NotFound for unknown ids,
    InvalidArgument for bad input, FailedPrecondition for a wrong state, DeadlineExceeded or
    Unavailable when the guest does not answer, AgentError with the guest's own words.
    """

    def __init__(self, config: Config, hypervisor: Hypervisor, image: GuestImage) -> None:
        self.ctx = SandboxContext(config, hypervisor, image)
        self.ctx.on_agent_violation = self._agent_misbehaved
        self.templates = Templates(self.ctx)
        pool = WarmPool(self.ctx, self.templates)
        self._pool_leftovers = pool  # cleaned up at every start, whatever the config says now
        pool_wanted = config.templates.handlers and config.templates.warm_pool and self.templates.supported
        self.warm_pool = pool if pool_wanted else None
        self._consoles = ConsoleSweeper(self.ctx)

    def _agent_misbehaved(self, sandbox_id: str, reason: str) -> None:
        """A sandbox whose agent broke the protocol is BROKEN (a booting one fails its boot)."""
        try:
            lifecycle.mark_broken(self.ctx, sandbox_id, reason)
        except Exception as e:  # called from the agent client: nothing may escape into its caller
            log.warning("cannot mark sandbox %s broken: %s", sandbox_id, e)

    # -- what callers read -------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def hypervisor(self) -> Hypervisor:
        return self.ctx.hypervisor

    @property
    def image(self) -> GuestImage:
        return self.ctx.image

    @property
    def networking(self) -> PodNetworking:
        return self.ctx.networking

    @property
    def accel(self) -> Accel:
        return self.ctx.accel

    @property
    def accel_reason(self) -> str:
        return self.ctx.accel_reason

    @property
    def transport(self) -> str:
        return self.ctx.transport

    @property
    def cgroups_reason(self) -> str:
        return self.ctx.cgroups_reason

    @property
    def boot_timings(self) -> dict[str, BootTimings]:
        return self.ctx.boot_timings

    def console_log(self, sandbox_id: str) -> Path:
        return self.ctx.console_log(sandbox_id)

    def sandbox_dir(self, sandbox_id: str) -> Path:
        """Every host file of the sandbox lives below this dir or its ``run_dir``."""
        return self.ctx.sandbox_dir(sandbox_id)

    def run_dir(self, sandbox_id: str) -> Path:
        return self.ctx.run_dir(sandbox_id)

    def schema0_cri_facts(self) -> dict[str, dict[str, Any]]:
        """What records of the previous release kept for the CRI layer (``SandboxStore``)."""
        return dict(self.ctx.store.schema0_cri_facts)

    def unreadable_records(self) -> dict[str, str]:
        """Sandbox records on disk that could not be read at start: id -> why."""
        return dict(self.ctx.store.unreadable)

    # -- sandboxes ---------------------------------------------------------------------------

    def create_sandbox(
        self,
        sandbox_id: str | None = None,
        *,
        hostname: str = "",
        dns: DnsConfig | None = None,
        kernel: PodKernel | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        cgroup_parent: str = "",
        network: NetworkRequest | None = None,
        cmdline_extra: tuple[str, ...] = (),
        ready_timeout: float | None = None,
        from_template: bool = False,
    ) -> SandboxRecord:
        """Boots a VM, waits for its agent and sets the sandbox up in the guest (``boot``).

        The VMM is accounted in a host cgroup: below ``cgroup_parent`` (the pod's cgroup) or below
        the overhead cgroup, as ``overhead.vmm_cgroup`` in the config says. With ``network`` the
        pod gets a network namespace, a CNI interface and a guest NIC joined to it; without, the
        guest has only loopback.

        On any failure everything created so far is released before the error is raised; a guest
        that does not answer gives DeadlineExceeded naming the sandbox, with its console tail.

        ``from_template``: the VM is a clone of the template of its size class (built first when
        there is none); where no template can be used, the VM boots cold (with a warning).
        """
        ctx = self.ctx
        sandbox_id = check_id("sandbox id", sandbox_id or secrets.token_hex(32))
        with ctx.lock_for(sandbox_id, creating=True):
            if ctx.store.exists(sandbox_id):
                raise FailedPrecondition(f"sandbox {sandbox_id} exists already")
            record = SandboxRecord(
                id=sandbox_id,
                vm_name=lifecycle.vm_name_of(sandbox_id),
                backend=ctx.hypervisor.name,
                accel=ctx.accel,
                transport=ctx.transport,
                shared_fs=ctx.shared_fs,
                vcpus=vcpus or ctx.config.sandbox.vcpus,
                memory_mib=memory_mib or ctx.config.sandbox.memory_mib,
                hostname=hostname or sandbox_id[:12],
                state=SandboxState.BOOTING,
                created_at_ns=time.time_ns(),
                scsi_disks=True,
            )
            SandboxBoot(
                ctx,
                record,
                dns=dns,
                kernel=kernel,
                network=network,
                cgroup_parent=cgroup_parent,
                cmdline_extra=cmdline_extra,
                ready_timeout=ready_timeout or ctx.config.agent.ready_timeout_seconds,
                templates=self.templates if from_template else None,
                warm_pool=self.warm_pool if from_template else None,
            ).run()
            return record

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        """Raises NotFound."""
        return self.ctx.store.get(sandbox_id)

    def list_sandboxes(self) -> list[SandboxRecord]:
        return self.ctx.store.all()

    def find_container(self, container_id: str) -> tuple[SandboxRecord, ContainerRecord]:
        """The container with that id and its sandbox (an index lookup, no scan).

        Raises:
            NotFound: no sandbox has such a container.
        """
        record = self.ctx.store.get(self.ctx.store.sandbox_of(container_id))
        try:
            return record, record.containers[container_id]
        except KeyError:
            raise NotFound(f"container {container_id} not found") from None

    def client(self, sandbox_id: str) -> AgentClient:
        """The agent client of a ready sandbox.

        Raises:
            NotFound. FailedPrecondition: the sandbox is not ready (booting, broken or stopped).
        """
        return self.ctx.ready_client(self.ctx.store.get(sandbox_id))

    def refresh(self, sandbox_id: str, timeout: float | None = None) -> SandboxRecord:
        return recovery.refresh(self.ctx, sandbox_id, timeout)

    def mark_broken(self, sandbox_id: str, reason: str) -> None:
        lifecycle.mark_broken(self.ctx, sandbox_id, reason)

    def stop_sandbox(self, sandbox_id: str) -> None:
        lifecycle.stop(self.ctx, sandbox_id)

    def destroy_sandbox(self, sandbox_id: str) -> None:
        lifecycle.destroy(self.ctx, sandbox_id)

    def recover(self) -> None:
        recovery.recover(self.ctx)
        self._pool_leftovers.clean_up()
        if self.config.templates.handlers:
            self.templates.clean_up()

    def start_warm_pool(self) -> None:
        """Removes what an earlier run left of the warm pool and starts filling it (the server)."""
        if self.warm_pool is not None:
            self.warm_pool.start()

    def template_memory_bytes(self, key: str) -> int:
        """How much guest memory the template ``key`` holds (0 for none or an unknown one)."""
        info = self.templates.store.info(key) if key else None
        return info.data_bytes if info else 0

    def trim_consoles(self) -> SweepResult:
        """Cuts every console log past ``sandbox.console_log_max_bytes`` back to its latest half."""
        return self._consoles.sweep()

    def close(self) -> None:
        """Lets go of every agent connection, output pump and log file, leaving the VMs running
        (the runtime stops; a new one recovers them with ``recover``)."""
        self.ctx.stdio.stop_all()
        self.ctx.drop_all_clients()
        self.ctx.stdio.close_all(STDIO_POLL_SECONDS + 5)
        if self.warm_pool is not None:
            self.warm_pool.drain()
        self.templates.close()

    # -- containers --------------------------------------------------------------------------

    def create_container(
        self,
        sandbox_id: str,
        container_id: str | None = None,
        *,
        lower_dirs: list[Path],
        process: ProcessSpec,
        name: str = "",
        log_path: Path | None = None,
        readonly_rootfs: bool = False,
        mounts: list[HostMount] | None = None,
        resources: dict[str, Any] | None = None,
        isolation: Isolation | None = None,
    ) -> ContainerRecord:
        return containers.create(
            self.ctx,
            sandbox_id,
            container_id,
            lower_dirs=lower_dirs,
            process=process,
            name=name,
            log_path=log_path,
            readonly_rootfs=readonly_rootfs,
            mounts=mounts,
            resources=resources,
            isolation=isolation,
        )

    def start_container(self, sandbox_id: str, container_id: str) -> None:
        containers.start(self.ctx, sandbox_id, container_id)

    def wait_container(self, sandbox_id: str, container_id: str, timeout: float) -> ExitStatus | None:
        return containers.wait(self.ctx, sandbox_id, container_id, timeout)

    def stop_container(
        self, sandbox_id: str, container_id: str, grace: float = 10.0, stop_signal: int = signal.SIGTERM
    ) -> ExitStatus:
        return containers.stop(self.ctx, sandbox_id, container_id, grace, stop_signal)

    def remove_container(self, sandbox_id: str, container_id: str) -> None:
        containers.remove(self.ctx, sandbox_id, container_id)

    def wait_output(self, sandbox_id: str, container_id: str, timeout: float) -> bool:
        return containers.wait_output(self.ctx, sandbox_id, container_id, timeout)

    def reopen_log(self, sandbox_id: str, container_id: str) -> None:
        containers.reopen_log(self.ctx, sandbox_id, container_id)

    def update_container_resources(self, sandbox_id: str, container_id: str, resources: dict[str, Any]) -> None:
        containers.update_resources(self.ctx, sandbox_id, container_id, resources)

    def exec_sync(self, sandbox_id: str, container_id: str, args: list[str], timeout: float = 60.0) -> ExecResult:
        return execs.exec_sync(self.ctx, sandbox_id, container_id, args, timeout)

    def exec_streaming(self, sandbox_id: str, container_id: str, args: list[str], io: ProcessIO) -> int:
        return execs.exec_streaming(self.ctx, sandbox_id, container_id, args, io)

    def guest_shell(self, sandbox_id: str, args: list[str], io: ProcessIO) -> int:
        return execs.guest_shell(self.ctx, sandbox_id, args, io)

    def attach(self, sandbox_id: str, container_id: str, io: ProcessIO) -> int:
        return interactive.attach(self.ctx, sandbox_id, container_id, io)

    def open_port(self, sandbox_id: str, port: int) -> PortStream | RelayStream:
        """A TCP connection to 127.0.0.1:``port`` in the pod, made from inside its guest: relayed
        over the pod's network when it has one (fast), else through the agent's protocol.

        Raises:
            NotFound. FailedPrecondition: the sandbox is not ready. AgentError UNAVAILABLE:
            nothing listens there.
        """
        record = self.ctx.store.get(sandbox_id)
        client = self.ctx.ready_client(record)
        address = record.network.addresses[0].split("/")[0] if record.network and record.network.addresses else ""
        if address:
            try:
                return RelayStream(client, address, port)
            except AgentError as e:
                if e.grpc_code == "UNAVAILABLE":
                    raise
                log.info("port-forward to %s: no relay in the guest (%s): through the agent", sandbox_id[:12], e)
            except OSError as e:
                log.info(
                    "port-forward to %s: relay at %s unreachable (%s): through the agent", sandbox_id[:12], address, e
                )
        return PortStream(client, port)

    # -- figures -----------------------------------------------------------------------------

    def container_stats(self, sandbox_id: str, container_id: str, timeout: float | None = None) -> ContainerStats:
        record = self.ctx.store.get(sandbox_id)
        containers.find(record, container_id)
        return probes.container_stats(self.ctx, record, container_id, timeout)

    def writable_layer(self, sandbox_id: str, container_id: str) -> FilesystemUsage:
        return probes.writable_layer(self.ctx, sandbox_id, container_id)

    def memory_snapshot(self, sandbox_id: str) -> dict[str, int]:
        """What the sandbox costs now, by component, in bytes (see ``probes.memory_snapshot``)."""
        return probes.memory_snapshot(self.ctx, self.ctx.store.get(sandbox_id))

    def vmm_pid(self, sandbox_id: str) -> int:
        """Raises NotFound, or FailedPrecondition when the sandbox's VM does not run."""
        return probes.vmm_pid(self.ctx, self.ctx.store.get(sandbox_id))

    def vmm_memory(self, sandbox_id: str) -> dict[str, int]:
        """The VMM's memory beyond the guest's RAM, with its parts (see ``probes.vmm_memory``)."""
        return probes.vmm_memory(self.ctx, self.ctx.store.get(sandbox_id))

    def vm_usage(self, sandbox_id: str) -> VmUsage:
        return probes.vm_usage(self.ctx, self.ctx.store.get(sandbox_id))

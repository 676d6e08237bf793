"""Sandboxes (one VM each) and the containers inside them: boot, agent handshake, container
lifecycle, output, teardown. Every host resource a sandbox owns lives below its sandbox dir or
its run dir, and destroying the sandbox releases all of it, also after a failed create."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsandbox.agent.client import AgentClient, ExitStatus, serial_connector, vsock_connector
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.config import Config
from kvmsandbox.errors import (
    AgentError,
    DeadlineExceeded,
    FailedPrecondition,
    KvmSandboxError,
    NotFound,
    Unavailable,
)
from kvmsandbox.guest_image import GuestImage
from kvmsandbox.hypervisor.accel import detect_accel
from kvmsandbox.hypervisor.spec import AgentChannel, Hypervisor, VMSpec
from kvmsandbox.network.cni import PortMapping
from kvmsandbox.network.pod import PodNetwork, PodNetworking
from kvmsandbox.overhead import measure
from kvmsandbox.host.cgroups import HostCgroup, cgroups_available
from kvmsandbox.sandbox import oci_spec, rootfs
from kvmsandbox.sandbox.logs import CriLogWriter
from kvmsandbox.sandbox.store import ContainerRecord, SandboxRecord, SandboxStore, check_id

log = logging.getLogger(__name__)

SHARE_TAG = "kvmshared"
GUEST_SHARE = "/run/kvmsandbox/shared"
CONSOLE_TAIL_LINES = 25
STDIO_POLL_SECONDS = 5.0


def guest_rootfs_path(container_id: str) -> str:
    return f"{GUEST_SHARE}/containers/{container_id}/rootfs"


def choose_transport(configured: str) -> str:
    """vsock wherever the host has vhost-vsock, virtio-serial otherwise (or as configured)."""
    if configured != "auto":
        return configured
    return "vsock" if os.access("/dev/vhost-vsock", os.R_OK | os.W_OK) else "virtio-serial"


def console_tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    tail = [line.rstrip("\r") for line in text.splitlines()[-lines:]]
    return "\n".join(tail) or "(no console output)"


@dataclass(frozen=True)
class HostMount:
    """A host file or directory made visible at ``container_path`` in a container."""

    host_path: Path
    container_path: str
    readonly: bool = False


@dataclass(frozen=True)
class NetworkRequest:
    """What a pod asks of its network: port mappings (CNI portmap) and CNI_ARGS (pod name...)."""

    port_mappings: list[PortMapping]
    args: dict[str, str]


@dataclass
class BootTimings:
    """Seconds from the create request to each phase of a sandbox boot."""

    vmm_started: float = 0.0
    agent_ready: float = 0.0
    sandbox_ready: float = 0.0


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class _OutputPump:
    """Copies a process's stdout and stderr from the agent to a sink until both end."""

    def __init__(
        self, client: AgentClient, container_id: str, exec_id: str, sink: Callable[[str, bytes | None], None]
    ) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._pump,
                args=(client, container_id, exec_id, stream, name, sink, self._stop),
                name=f"stdio-{container_id[:12]}-{name}",
                daemon=True,
            )
            for stream, name in ((pb.STDOUT, "stdout"), (pb.STDERR, "stderr"))
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(
        client: AgentClient,
        container_id: str,
        exec_id: str,
        stream: pb.Stream.ValueType,
        name: str,
        sink: Callable[[str, bytes | None], None],
        stop: threading.Event,
    ) -> None:
        failures = 0
        while not stop.is_set():
            try:
                data, eof = client.read_stdio(container_id, exec_id, stream, STDIO_POLL_SECONDS)
            except (AgentError, Unavailable, DeadlineExceeded) as e:
                # NotFound: the container is gone. Anything else: retry a few times, the agent
                # may be reconnecting.
                failures += 1
                if (isinstance(e, AgentError) and e.grpc_code == "NOT_FOUND") or failures > 20:
                    break
                time.sleep(0.2)
                continue
            failures = 0
            if data:
                sink(name, data)
            if eof:
                break
        sink(name, None)

    def stop(self) -> None:
        """Stops copying after the current read (the runtime shuts down; the guest keeps the rest)."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)


class _Collector:
    """Sink that keeps output in memory (ExecSync)."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    def __call__(self, stream: str, data: bytes | None) -> None:
        if data:
            self.data[stream] += data


class _LogSink:
    """Sink that writes CRI-format log lines."""

    def __init__(self, writer: CriLogWriter) -> None:
        self.writer = writer

    def __call__(self, stream: str, data: bytes | None) -> None:
        if data is None:
            self.writer.close_stream(stream)
        else:
            self.writer.write(stream, data)


class SandboxManager:
    """Creates and destroys sandboxes and runs containers in them.

    Methods raise the classes of ``kvmsandbox.errors``: NotFound for unknown ids,
    InvalidArgument for bad input, FailedPrecondition for a wrong state, DeadlineExceeded or
    Unavailable when the guest does not answer, AgentError with the guest's own words.
    """

    def __init__(self, config: Config, hypervisor: Hypervisor, image: GuestImage) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.image = image
        self.store = SandboxStore(config.state_dir)
        accel = config.hypervisor.accel
        self.accel, self.accel_reason = (accel, "set in config") if accel != "auto" else detect_accel()
        self.transport = choose_transport(config.agent.transport)
        self._lock = threading.Lock()
        self._sandbox_locks: dict[str, threading.RLock] = {}
        self._clients: dict[str, AgentClient] = {}
        self._logs: dict[tuple[str, str], CriLogWriter] = {}
        self._pumps: dict[tuple[str, str], _OutputPump] = {}
        self.boot_timings: dict[str, BootTimings] = {}
        self.networking = PodNetworking(config)
        self._cgroups_ok, self.cgroups_reason = cgroups_available()
        if not self._cgroups_ok:
            log.warning("VMMs are not placed in host cgroups: %s", self.cgroups_reason)

    # -- paths -----------------------------------------------------------------------------

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.store.dir(sandbox_id)

    def run_dir(self, sandbox_id: str) -> Path:
        # Unix socket paths are limited to 108 bytes: a short, fixed-length name.
        return self.config.run_dir / hashlib.sha256(sandbox_id.encode()).hexdigest()[:16]

    def console_log(self, sandbox_id: str) -> Path:
        return self.sandbox_dir(sandbox_id) / "console.log"

    def _lock_for(self, sandbox_id: str) -> threading.RLock:
        with self._lock:
            return self._sandbox_locks.setdefault(sandbox_id, threading.RLock())

    # -- sandboxes -------------------------------------------------------------------------

    def create_sandbox(
        self,
        sandbox_id: str | None = None,
        *,
        hostname: str = "",
        dns: pb.DNSConfig | None = None,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        labels: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        cgroup_parent: str = "",
        network: NetworkRequest | None = None,
        cmdline_extra: tuple[str, ...] = (),
        ready_timeout: float | None = None,
    ) -> SandboxRecord:
        """Boots a VM, waits for its agent and sets the sandbox up in the guest.

        The VMM is accounted in a host cgroup: below ``cgroup_parent`` (the pod's cgroup) or below
        the overhead cgroup, as ``overhead.vmm_cgroup`` in the config says. With ``network`` the
        pod gets a network namespace, a CNI interface and a guest NIC joined to it; without, the
        guest has only loopback.

        On any failure everything created so far is released before the error is raised; a guest
        that does not answer gives DeadlineExceeded naming the sandbox, with its console tail.
        """
        sandbox_id = check_id("sandbox id", sandbox_id or secrets.token_hex(32))
        with self._lock_for(sandbox_id):
            if (self.sandbox_dir(sandbox_id) / "state.json").exists():
                raise FailedPrecondition(f"sandbox {sandbox_id} exists already")
            record = SandboxRecord(
                id=sandbox_id,
                vm_name=f"kvmsandbox-{sandbox_id[:16]}",
                backend=self.hypervisor.name,
                accel=self.accel,
                transport=self.transport,
                vcpus=vcpus or self.config.sandbox.vcpus,
                memory_mib=memory_mib or self.config.sandbox.memory_mib,
                hostname=hostname or sandbox_id[:12],
                state="booting",
                created_at_ns=time.time_ns(),
                labels=dict(labels or {}),
                extra=dict(extra or {}),
                cgroup=self._cgroup_path(sandbox_id, cgroup_parent),
            )
            try:
                self._boot(
                    record, cmdline_extra, ready_timeout or self.config.agent.ready_timeout_seconds, dns, network
                )
            except BaseException:
                self._teardown(record.id, record.vm_name, record, must_release=False)
                raise
            return record

    def _cgroup_path(self, sandbox_id: str, cgroup_parent: str) -> str:
        """Where the VMM is accounted; "" when the host has no usable cgroups."""
        if not self._cgroups_ok:
            return ""
        oc = self.config.overhead
        parent = oc.overhead_cgroup if oc.vmm_cgroup == "overhead" else (cgroup_parent or oc.default_cgroup_parent)
        return posixpath.normpath("/" + parent.strip("/") + f"/kvmsandbox-{sandbox_id[:16]}")

    def _vmm_cgroup(self, record: SandboxRecord) -> tuple[Path, ...]:
        """Creates the sandbox's host cgroup and returns the files through which the VMM joins it.
        The record names the leaf from the start, so a teardown after any failure removes it."""
        if not record.cgroup:
            return ()
        cg = HostCgroup(record.cgroup)
        for attempt in range(3):
            try:
                created = cg.create()
                break
            except FailedPrecondition:
                # Another sandbox's teardown may have removed a parent between our mkdirs.
                if attempt == 2:
                    raise
        # The configured parents are shared by every pod without a cgroup of its own: they stay.
        oc = self.config.overhead
        shared: set[str] = set()
        for parent in (oc.default_cgroup_parent, oc.overhead_cgroup):
            path = posixpath.normpath("/" + parent.strip("/"))
            while path != "/":
                shared.add(path)
                path = posixpath.dirname(path)
        record.cgroup_created = [p for p in created if p not in shared]
        self.store.save(record)
        return tuple(cg.procs_files())

    def _boot(
        self,
        record: SandboxRecord,
        cmdline_extra: tuple[str, ...],
        ready_timeout: float,
        dns: pb.DNSConfig | None,
        network: NetworkRequest | None,
    ) -> None:
        sdir = self.sandbox_dir(record.id)
        run_dir = self.run_dir(record.id)
        shared = sdir / "shared"
        for d in (sdir, shared, run_dir):
            d.mkdir(parents=True, exist_ok=True)
        rootfs.seal_shared_dir(shared)
        (shared / "containers").mkdir(exist_ok=True)
        if record.transport == "vsock":
            record.guest_cid = 3 + secrets.randbelow(2**31 - 4)
            channel = AgentChannel(transport="vsock", socket_path=None, guest_cid=record.guest_cid)
        else:
            record.agent_socket = str(run_dir / "agent.sock")
            channel = AgentChannel(transport="virtio-serial", socket_path=Path(record.agent_socket), guest_cid=None)
        self.store.save(record)
        pod_net = None
        if network is not None:
            # Recorded (by name) before anything is made, so a teardown after any failure finds it.
            record.network = {"pending": True}
            self.store.save(record)
            pod_net = self.networking.setup(record.id, network.port_mappings, network.args)
            record.network = pod_net.to_json()
            self.store.save(record)
        spec = VMSpec(
            name=record.vm_name,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            accel=self.accel,
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            cmdline=self.image.cmdline(extra=cmdline_extra),
            root_disk=self.image.rootfs,
            shared_dir=shared,
            agent=channel,
            console_log=self.console_log(record.id),
            run_dir=run_dir,
            tb_cache_mib=self.config.hypervisor.tb_cache_mib,
            cgroup_procs=self._vmm_cgroup(record),
            nic=pod_net.nic() if pod_net else None,
        )
        started = time.monotonic()
        timings = self.boot_timings[record.id] = BootTimings()
        self.hypervisor.boot(spec)
        timings.vmm_started = time.monotonic() - started
        if pod_net is not None:
            self.networking.attach(pod_net)
        client = self._client(record)

        def alive() -> bool:
            info = self.hypervisor.info(record.vm_name)
            return info is not None and info.running

        try:
            client.wait_ready(ready_timeout, alive)
        except (DeadlineExceeded, Unavailable) as e:
            tail = console_tail(self.console_log(record.id))
            raise type(e)(
                f"sandbox {record.id}: the guest agent did not become ready ({e}); "
                f"last lines of the console log {self.console_log(record.id)}:\n{tail}"
            ) from None
        timings.agent_ready = time.monotonic() - started
        files = client.create_sandbox(
            pb.CreateSandboxRequest(
                sandbox_id=record.id,
                hostname=record.hostname,
                dns=dns or pb.DNSConfig(),
                storages=[pb.Storage(driver="9p", source=SHARE_TAG, mount_point=GUEST_SHARE)],
                interfaces=pod_net.guest_interfaces() if pod_net else [],
                routes=pod_net.guest_routes() if pod_net else [],
            )
        )
        record.guest_files = {
            "hostname": files.hostname_path,
            "hosts": files.hosts_path,
            "resolv.conf": files.resolv_conf_path,
        }
        timings.sandbox_ready = time.monotonic() - started
        record.state = "ready"
        try:
            record.overhead_at_boot = measure.snapshot(self, record, client.guest_details()).memory
        except KvmSandboxError as e:
            log.warning("sandbox %s: could not measure its overhead at boot: %s", record.id, e)
        self.store.save(record)
        log.info("sandbox ready id=%s vm=%s seconds=%.2f", record.id, record.vm_name, timings.sandbox_ready)

    def _client(self, record: SandboxRecord) -> AgentClient:
        with self._lock:
            client = self._clients.get(record.id)
            if client is None:
                connector = (
                    vsock_connector(record.guest_cid)
                    if record.transport == "vsock"
                    else serial_connector(Path(record.agent_socket))
                )
                client = AgentClient(
                    connector, f"sandbox {record.id}", default_timeout=self.config.agent.call_timeout_seconds
                )
                self._clients[record.id] = client
            return client

    def client(self, sandbox_id: str) -> AgentClient:
        """The agent client of a ready sandbox.

        Raises:
            NotFound. FailedPrecondition: the sandbox is not ready (stopped or still booting).
        """
        record = self.store.load(sandbox_id)
        if record.state != "ready":
            raise FailedPrecondition(f"sandbox {sandbox_id} is {record.state}, not ready")
        return self._client(record)

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        return self.store.load(sandbox_id)

    def list_sandboxes(self) -> list[SandboxRecord]:
        out = []
        for sid in self.store.ids():
            try:
                out.append(self.store.load(sid))
            except NotFound:
                continue
        return out

    def destroy_sandbox(self, sandbox_id: str) -> None:
        """Stops every container, destroys the VM and removes every host file of the sandbox.

        Idempotent: an unknown or half-created sandbox is cleaned up as far as anything of it exists.
        """
        check_id("sandbox id", sandbox_id)
        with self._lock_for(sandbox_id):
            try:
                record: SandboxRecord | None = self.store.load(sandbox_id)
            except NotFound:
                record = None
            vm_name = record.vm_name if record else f"kvmsandbox-{sandbox_id[:16]}"
            if record is not None and record.state == "ready":
                try:
                    self._client(record).destroy_sandbox(timeout=10)
                except KvmSandboxError as e:
                    log.warning("sandbox %s: guest teardown failed, destroying the VM anyway: %s", sandbox_id, e)
            self._teardown(sandbox_id, vm_name, record)

    def stop_sandbox(self, sandbox_id: str) -> None:
        """Kills every container, records how each ended and destroys the VM; the sandbox and its
        containers stay listed (not ready, exited) until removed. Idempotent.

        Raises:
            NotFound: no such sandbox.
        """
        with self._lock_for(sandbox_id):
            record = self.store.load(sandbox_id)
            if record.state == "stopped":
                if self._release_pending(record):
                    self._finish_stop(record, self._release_vm(sandbox_id, record.vm_name, record))
                return
            if record.state == "ready":
                client = self._client(record)
                for c in record.containers.values():
                    if c.state == "exited":
                        continue
                    status = None
                    with contextlib.suppress(KvmSandboxError):
                        client.signal_process(c.id, signal.SIGKILL)
                        status = client.wait_process(c.id, "", 10)
                    self._mark_exited(c, status, "sandbox stopped")
            problems = self._release_vm(sandbox_id, record.vm_name, record)
            record.state = "stopped"
            record.stopped_at_ns = time.time_ns()
            self._finish_stop(record, problems)

    def _finish_stop(self, record: SandboxRecord, problems: list[str]) -> None:
        """Saves a stopped sandbox; Unavailable when its network or cgroup is not released yet
        (stopping again retries, as the kubelet does)."""
        self.store.save(record)
        if problems:
            raise Unavailable(f"sandbox {record.id} is stopped, but {'; '.join(problems)}. Stop it again to retry")
        log.info("sandbox stopped id=%s vm=%s", record.id, record.vm_name)

    @staticmethod
    def _mark_exited(c: ContainerRecord, status: ExitStatus | None, reason: str) -> None:
        c.state = "exited"
        if status is not None:
            c.exit_code = status.exit_code
            c.finished_at_ns = status.finished_at_ns
        else:
            # Nobody saw it end (the VM went away first): as containerd, report 255.
            c.exit_code = 255 if c.exit_code is None else c.exit_code
            c.finished_at_ns = c.finished_at_ns or time.time_ns()
            c.extra.setdefault("reason", reason)

    def recover(self) -> None:
        """After a restart of the runtime: reconnects to the agents of running sandboxes, brings
        container states up to date, resumes copying container output to the logs; sandboxes whose
        VM is gone become stopped, half-created ones are removed."""
        running = {info.name for info in self.hypervisor.list() if info.running}
        for record in self.list_sandboxes():
            with self._lock_for(record.id):
                if record.state == "booting":
                    log.warning("sandbox %s was being created when the runtime stopped: removing it", record.id)
                    self._teardown(record.id, record.vm_name, record, must_release=False)
                    continue
                if record.state != "ready":
                    continue
                if record.vm_name not in running:
                    log.warning("sandbox %s: its VM %s is gone: marking it stopped", record.id, record.vm_name)
                    for c in record.containers.values():
                        if c.state != "exited":
                            self._mark_exited(c, None, "sandbox VM exited")
                    self._release_vm(record.id, record.vm_name, record)
                    record.state = "stopped"
                    record.stopped_at_ns = time.time_ns()
                    self.store.save(record)
                    continue
                try:
                    in_guest = self._sync_containers(record)
                except KvmSandboxError as e:
                    log.warning("sandbox %s: agent not reachable during recovery: %s", record.id, e)
                    continue
                client = self._client(record)
                for c in record.containers.values():
                    if c.id in in_guest:
                        self._start_pump(record.id, c, client)
                log.info("sandbox recovered id=%s containers=%d", record.id, len(record.containers))

    def _sync_containers(self, record: SandboxRecord) -> set[str]:
        """Updates ``record`` (and saves it) with the containers' states in the guest; returns the
        ids the guest knows."""
        infos = {i.id: i for i in self._client(record).list_containers()}
        for c in record.containers.values():
            info = infos.get(c.id)
            if c.state == "exited":
                continue
            if info is None:
                self._mark_exited(c, None, "container lost by the guest")
            elif info.state == pb.EXITED:
                self._mark_exited(c, ExitStatus(info.exit_code, 0, info.finished_at_ns), "")
                if info.oom_killed:
                    c.extra["oom_killed"] = True
            elif info.state == pb.RUNNING:
                c.state = "running"
        self.store.save(record)
        return set(infos)

    def refresh(self, sandbox_id: str) -> SandboxRecord:
        """The sandbox record with its containers' states as the guest sees them now."""
        with self._lock_for(sandbox_id):
            record = self.store.load(sandbox_id)
            if record.state == "ready" and any(c.state != "exited" for c in record.containers.values()):
                with contextlib.suppress(KvmSandboxError):
                    self._sync_containers(record)
            return record

    def _start_pump(self, sandbox_id: str, c: ContainerRecord, client: AgentClient) -> None:
        key = (sandbox_id, c.id)
        with self._lock:
            if key in self._pumps:
                return
            writer = self._logs.get(key) or CriLogWriter(Path(c.log_path))
            self._logs[key] = writer
            self._pumps[key] = _OutputPump(client, c.id, "", _LogSink(writer))

    def close(self) -> None:
        """Lets go of every agent connection, output pump and log file, leaving the VMs running
        (the runtime stops; a new one recovers them with ``recover``)."""
        with self._lock:
            pumps = list(self._pumps.values())
            clients = list(self._clients.values())
            writers = list(self._logs.values())
            self._pumps.clear()
            self._clients.clear()
            self._logs.clear()
        for pump in pumps:
            pump.stop()
        for client in clients:
            client.close()
        for pump in pumps:
            pump.join(STDIO_POLL_SECONDS + 5)
        for w in writers:
            w.close()

    def reopen_log(self, sandbox_id: str, container_id: str) -> None:
        """Starts a new log file at the container's log path (after kubelet rotated the old one).

        Raises:
            NotFound. FailedPrecondition: the container is not running.
        """
        c = self._container(self.store.load(sandbox_id), container_id)
        if c.state != "running":
            raise FailedPrecondition(
                f"container {container_id} is {c.state}: only a running container's log is reopened"
            )
        with self._lock:
            writer = self._logs.get((sandbox_id, container_id))
        if writer is None:
            raise FailedPrecondition(f"container {container_id} has no open log")
        writer.reopen()

    def _release_vm(
        self,
        sandbox_id: str,
        vm_name: str,
        record: SandboxRecord | None = None,
        *,
        remove_netns: bool = False,
        retry_later: bool = True,
    ) -> list[str]:
        """Destroys the VM, releases its network (CNI DEL; the namespace too with ``remove_netns``),
        removes its host cgroup and drops the client, the output pumps and the log writers.

        Returns what could not be released (the caller saves ``record``, which says what is done).
        """
        with self._lock:
            client = self._clients.pop(sandbox_id, None)
            keys = [k for k in self._pumps if k[0] == sandbox_id]
            pumps = [self._pumps.pop(k) for k in keys]
            writers = [self._logs.pop(k) for k in list(self._logs) if k[0] == sandbox_id]
        problems: list[str] = []
        self.hypervisor.destroy(vm_name)
        if record is not None and record.network and (remove_netns or not record.network.get("released")):
            pod_net = PodNetwork.from_json(record.network) if "netns" in record.network else None
            try:
                self.networking.teardown(sandbox_id, pod_net, remove_netns=remove_netns, retry_later=retry_later)
                record.network["released"] = True
            except KvmSandboxError as e:
                log.warning("sandbox %s: its network was not fully released: %s", sandbox_id, e)
                record.network["released"] = False
                problems.append(f"network: {e}")
        if record is not None and record.cgroup:
            try:
                HostCgroup(record.cgroup).remove(record.cgroup_created)
                record.cgroup_created = []
            except KvmSandboxError as e:
                log.warning("sandbox %s: its cgroup %s stays: %s", sandbox_id, record.cgroup, e)
                problems.append(f"cgroup {record.cgroup}: {e}")
        if client is not None:
            client.close()
        for pump in pumps:
            pump.join(5)
        for w in writers:
            w.close()
        return problems

    @staticmethod
    def _release_pending(record: SandboxRecord) -> bool:
        """A stopped sandbox whose network or cgroup could not be released yet."""
        network = bool(record.network) and not record.network.get("released", False)
        return network or bool(record.cgroup and HostCgroup(record.cgroup).exists())

    def _teardown(
        self, sandbox_id: str, vm_name: str, record: SandboxRecord | None = None, *, must_release: bool = True
    ) -> None:
        """Releases everything and removes the sandbox's files and record.

        With ``must_release`` (RemovePodSandbox) a network or cgroup that could not be released
        keeps the record, stopped, and raises Unavailable: removing again retries, as the kubelet
        does. Without (a failed create, recovery), what could not be released is logged, and the
        cached CNI state goes with the record, since nothing would retry it.
        """
        problems = self._release_vm(
            sandbox_id,
            vm_name,
            record,
            remove_netns=record is not None and bool(record.network),
            retry_later=must_release,
        )
        if problems and must_release and record is not None:
            if record.state != "stopped":
                for c in record.containers.values():
                    if c.state != "exited":
                        self._mark_exited(c, None, "sandbox removed")
                record.state = "stopped"
                record.stopped_at_ns = time.time_ns()
            self.store.save(record)
            raise Unavailable(
                f"sandbox {sandbox_id} is stopped but not removed: {'; '.join(problems)}. Remove it again to retry"
            )
        if problems:
            self.networking.forget(sandbox_id)
        rootfs.remove_tree(self.sandbox_dir(sandbox_id))
        shutil.rmtree(self.run_dir(sandbox_id), ignore_errors=True)
        self.boot_timings.pop(sandbox_id, None)
        log.info("sandbox removed id=%s vm=%s", sandbox_id, vm_name)

    # -- containers ------------------------------------------------------------------------

    def _container(self, record: SandboxRecord, container_id: str) -> ContainerRecord:
        c = record.containers.get(container_id)
        if c is None:
            raise NotFound(f"container {container_id} not found in sandbox {record.id}")
        return c

    def create_container(
        self,
        sandbox_id: str,
        container_id: str | None = None,
        *,
        lower_dirs: list[Path],
        process: oci_spec.ProcessSpec,
        name: str = "",
        log_path: Path | None = None,
        readonly_rootfs: bool = False,
        labels: dict[str, str] | None = None,
        mounts: list[HostMount] | None = None,
        resources: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ContainerRecord:
        """Prepares the rootfs on the host and creates the container in the guest (not started).

        Output goes to ``log_path`` in the CRI log format (default: the container's dir).
        """
        container_id = check_id("container id", container_id or secrets.token_hex(32))
        with self._lock_for(sandbox_id):
            record = self.store.load(sandbox_id)
            if record.state != "ready":
                raise FailedPrecondition(f"sandbox {sandbox_id} is {record.state}: cannot create containers in it")
            if container_id in record.containers:
                raise FailedPrecondition(f"container {container_id} exists already in sandbox {sandbox_id}")
            client = self._client(record)
            sdir = self.sandbox_dir(sandbox_id)
            layer_dir = sdir / "layers" / container_id
            target = sdir / "shared" / "containers" / container_id / "rootfs"
            log_file = log_path or sdir / "logs" / f"{container_id}.log"
            rootfs.mount_rootfs(lower_dirs, layer_dir, target)
            mounts_dir = sdir / "shared" / "mounts" / container_id
            try:
                guest_mounts = [
                    oci_spec.Mount(record.guest_files[name], f"/etc/{name}")
                    for name in ("hostname", "hosts", "resolv.conf")
                    if name in record.guest_files
                ]
                for i, m in enumerate(mounts or []):
                    rootfs.bind_host_path(m.host_path, mounts_dir / str(i), m.readonly)
                    guest_mounts.append(
                        oci_spec.Mount(f"{GUEST_SHARE}/mounts/{container_id}/{i}", m.container_path, m.readonly)
                    )
                spec = oci_spec.container_spec(
                    root_path=guest_rootfs_path(container_id),
                    process=process,
                    hostname=record.hostname,
                    readonly_rootfs=readonly_rootfs,
                    mounts=guest_mounts,
                    cgroups_path=f"/kvmsandbox/{container_id}",
                    resources=resources,
                )
                pid = client.create_container(container_id, spec)
                writer = CriLogWriter(log_file)
            except BaseException:
                rootfs.remove_tree(target.parent)
                rootfs.remove_tree(mounts_dir)
                rootfs.remove_tree(layer_dir)
                raise
            container = ContainerRecord(
                id=container_id,
                sandbox_id=sandbox_id,
                name=name or container_id[:12],
                state="created",
                args=list(process.args),
                lower_dirs=[str(d) for d in lower_dirs],
                log_path=str(log_file),
                pid=pid,
                created_at_ns=time.time_ns(),
                labels=dict(labels or {}),
                extra=dict(extra or {}),
            )
            record.containers[container_id] = container
            self.store.save(record)
            with self._lock:
                self._logs[(sandbox_id, container_id)] = writer
            self._start_pump(sandbox_id, container, client)
            return container

    def start_container(self, sandbox_id: str, container_id: str) -> None:
        with self._lock_for(sandbox_id):
            record = self.store.load(sandbox_id)
            c = self._container(record, container_id)
            if c.state != "created":
                raise FailedPrecondition(f"container {container_id} is {c.state}, not created")
            self.client(sandbox_id).start_container(container_id)
            c.state = "running"
            c.started_at_ns = time.time_ns()
            self.store.save(record)

    def wait_container(self, sandbox_id: str, container_id: str, timeout: float) -> ExitStatus | None:
        """The container's exit, waiting up to ``timeout`` seconds; None while it runs."""
        client = self.client(sandbox_id)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            status = client.wait_process(container_id, "", min(max(0.0, remaining), 30.0))
            if status is not None:
                self._record_exit(sandbox_id, container_id, status)
                return status
            if remaining <= 0:
                return None

    def _record_exit(self, sandbox_id: str, container_id: str, status: ExitStatus) -> None:
        with self._lock_for(sandbox_id):
            record = self.store.load(sandbox_id)
            c = self._container(record, container_id)
            if c.state != "exited":
                c.state = "exited"
                c.exit_code = status.exit_code
                c.finished_at_ns = status.finished_at_ns
                self.store.save(record)

    def stop_container(
        self, sandbox_id: str, container_id: str, grace: float = 10.0, stop_signal: int = signal.SIGTERM
    ) -> ExitStatus:
        """``stop_signal`` (SIGTERM unless the image says otherwise), then SIGKILL once ``grace``
        seconds passed. Idempotent for a stopped container."""
        record = self.store.load(sandbox_id)
        c = self._container(record, container_id)
        if c.state == "exited" and c.exit_code is not None:
            return ExitStatus(c.exit_code, 0, c.finished_at_ns)
        client = self.client(sandbox_id)
        if grace > 0:
            client.signal_process(container_id, stop_signal)
            status = self.wait_container(sandbox_id, container_id, grace)
            if status is not None:
                return status
        client.signal_process(container_id, signal.SIGKILL)
        status = self.wait_container(sandbox_id, container_id, 30.0)
        if status is None:
            raise DeadlineExceeded(f"container {container_id} did not exit after SIGKILL")
        return status

    def remove_container(self, sandbox_id: str, container_id: str) -> None:
        """Removes the container in the guest and its rootfs, layer and log sink on the host."""
        with self._lock_for(sandbox_id):
            record = self.store.load(sandbox_id)
            if container_id not in record.containers:
                raise NotFound(f"container {container_id} not found in sandbox {sandbox_id}")
            if record.state == "ready":
                try:
                    self._client(record).remove_container(container_id, force=True)
                except AgentError as e:
                    if e.grpc_code != "NOT_FOUND":
                        raise
            key = (sandbox_id, container_id)
            with self._lock:
                pump = self._pumps.pop(key, None)
                writer = self._logs.pop(key, None)
            if pump is not None:
                pump.join(10)
            if writer is not None:
                writer.close()
            sdir = self.sandbox_dir(sandbox_id)
            rootfs.remove_tree(sdir / "shared" / "containers" / container_id)
            rootfs.remove_tree(sdir / "shared" / "mounts" / container_id)
            rootfs.remove_tree(sdir / "layers" / container_id)
            del record.containers[container_id]
            self.store.save(record)

    def wait_output(self, sandbox_id: str, container_id: str, timeout: float) -> bool:
        """Waits until the container's stdout and stderr are closed and written to its log."""
        with self._lock:
            pump = self._pumps.get((sandbox_id, container_id))
        return pump.join(timeout) if pump is not None else True

    def exec_sync(self, sandbox_id: str, container_id: str, args: list[str], timeout: float = 60.0) -> ExecResult:
        """Runs ``args`` in a running container and returns its exit code and output.

        Raises:
            DeadlineExceeded: it ran longer than ``timeout`` seconds (it is killed).
        """
        record = self.store.load(sandbox_id)
        self._container(record, container_id)
        client = self.client(sandbox_id)
        exec_id = secrets.token_hex(8)
        client.exec_process(container_id, exec_id, oci_spec.process_object(oci_spec.ProcessSpec(args=args)))
        collector = _Collector()
        pump = _OutputPump(client, container_id, exec_id, collector)
        status = client.wait_process(container_id, exec_id, timeout)
        if status is None:
            client.signal_process(container_id, signal.SIGKILL, exec_id)
            client.wait_process(container_id, exec_id, 10)
            pump.join(10)
            raise DeadlineExceeded(f"command {args[0]!r} in container {container_id} ran longer than {timeout}s")
        pump.join(30)
        return ExecResult(status.exit_code, bytes(collector.data["stdout"]), bytes(collector.data["stderr"]))

    def update_container_resources(self, sandbox_id: str, container_id: str, resources: dict[str, Any]) -> None:
        """Applies OCI ``linux.resources`` to the container's cgroup in the guest."""
        self._container(self.store.load(sandbox_id), container_id)
        self.client(sandbox_id).update_container(container_id, resources)

    def container_stats(self, sandbox_id: str, container_id: str) -> pb.ContainerStatsResponse:
        self._container(self.store.load(sandbox_id), container_id)
        return self.client(sandbox_id).container_stats(container_id)

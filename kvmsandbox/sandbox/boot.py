"""One sandbox's boot as explicit phases: prepare host resources, place the VMM in its cgroup,
start the VM, connect the agent, configure the guest. Each phase that made something leaves how to
undo it; a failure anywhere undoes what was made, in reverse order, and re-raises."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import AgentMisbehaved, DeadlineExceeded, FailedPrecondition, KvmSandboxError, Unavailable
from kvmsandbox.host.beneath import private_dir
from kvmsandbox.host.cgroups import HostCgroup
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.hypervisor.spec import SHARED_DIR_TAG, AgentChannel, VMSpec
from kvmsandbox.sandbox import lifecycle, probes, rootfs
from kvmsandbox.sandbox.console import console_tail
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.states import SandboxState, move
from kvmsandbox.sandbox.types import BootTimings, DnsConfig, NetworkRequest, PodKernel

log = logging.getLogger(__name__)

GUEST_SHARE = "/run/kvmsandbox/shared"
PID_NAMESPACE_PATH = re.compile(r"^/run/kvmsandbox/sandbox/pid-namespace\Z")
SHM_PATH = re.compile(r"^/run/kvmsandbox/sandbox/shm\Z")
VIRTIOFSD_SOCKET = "fs.sock"


def cgroup_path(ctx: SandboxContext, sandbox_id: str, cgroup_parent: str) -> str:
    """Where the VMM is accounted; "" when the host has no usable cgroups."""
    if not ctx.cgroups_ok:
        return ""
    oc = ctx.config.overhead
    parent = oc.overhead_cgroup if oc.vmm_cgroup == "overhead" else (cgroup_parent or oc.default_cgroup_parent)
    return posixpath.normpath("/" + parent.strip("/") + f"/kvmsandbox-{sandbox_id[:16]}")


class SandboxBoot:
    """Boots the VM of one new record (state BOOTING, not saved yet) to READY."""

    def __init__(
        self,
        ctx: SandboxContext,
        record: SandboxRecord,
        *,
        dns: DnsConfig | None,
        network: NetworkRequest | None,
        kernel: PodKernel | None = None,
        cgroup_parent: str,
        cmdline_extra: tuple[str, ...],
        ready_timeout: float,
    ) -> None:
        self.ctx = ctx
        self.record = record
        # Named from the start, so a teardown after any failure (or a restart) finds the cgroup.
        record.cgroup = cgroup_path(ctx, record.id, cgroup_parent)
        self.dns = dns or DnsConfig()
        self.kernel = kernel or PodKernel()
        self.network = network
        self.cmdline_extra = cmdline_extra
        self.ready_timeout = ready_timeout
        self.timings = ctx.boot_timings[record.id] = BootTimings()
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._channel: AgentChannel | None = None
        self._cgroup_procs: tuple[Path, ...] = ()

    def run(self) -> None:
        """Runs every phase; on failure undoes what was made (reverse order) and re-raises."""
        started = time.monotonic()
        phases = (
            (self.prepare_host, "host_prepared"),
            (self.place_vmm, "vmm_placed"),
            (self.start_vm, "vmm_started"),
            (self.connect_agent, "agent_ready"),
            (self.configure_guest, "sandbox_ready"),
        )
        try:
            for phase, mark in phases:
                phase()
                setattr(self.timings, mark, time.monotonic() - started)
        except BaseException:
            self._rollback()
            raise
        log.info(
            "sandbox ready id=%s vm=%s seconds=%.2f", self.record.id, self.record.vm_name, self.timings.sandbox_ready
        )

    def _rollback(self) -> None:
        for what, undo in reversed(self._undo):
            try:
                undo()
            except Exception as e:  # the original error is the one to report
                log.warning("sandbox %s: undoing %s failed: %s", self.record.id, what, e)
        self.ctx.boot_timings.pop(self.record.id, None)

    # -- phases ------------------------------------------------------------------------------

    def prepare_host(self) -> None:
        """Directories, the sealed shared dir, the agent channel and the pod network; the record
        is saved before the network is made, so a restart in between finds it."""
        ctx, record = self.ctx, self.record
        sdir, run_dir = ctx.sandbox_dir(record.id), ctx.run_dir(record.id)
        self._undo.append(("the sandbox's files", lambda: self._remove_files(sdir, run_dir)))
        private_dir(sdir)
        # Not listable; a VMM's uid passes through to the one socket given to it (virtiofsd's).
        run_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        os.chmod(run_dir, 0o711)
        rootfs.seal_shared_dir(sdir)
        if record.transport == "vsock":
            record.guest_cid = 3 + secrets.randbelow(2**31 - 4)
            self._channel = AgentChannel(transport="vsock", socket_path=None, guest_cid=record.guest_cid)
        else:
            record.agent_socket = str(run_dir / "agent.sock")
            self._channel = AgentChannel(
                transport="virtio-serial", socket_path=Path(record.agent_socket), guest_cid=None
            )
        record.network_requested = self.network is not None
        ctx.store.save(record)
        if self.network is not None:
            self._undo.append(("the pod network", self._release_network))
            record.network = ctx.networking.setup(record.id, self.network.port_mappings, self.network.args)
            ctx.store.save(record)

    def place_vmm(self) -> None:
        """Creates the sandbox's host cgroup; the VMM joins it before it touches memory."""
        record = self.record
        if not record.cgroup:
            return
        self._undo.append(("the VMM's cgroup", lambda: lifecycle.release_cgroup(record)))
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
        oc = self.ctx.config.overhead
        shared: set[str] = set()
        for parent in (oc.default_cgroup_parent, oc.overhead_cgroup):
            path = posixpath.normpath("/" + parent.strip("/"))
            while path != "/":
                shared.add(path)
                path = posixpath.dirname(path)
        record.cgroup_created = [p for p in created if p not in shared]
        self.ctx.store.save(record)
        self._cgroup_procs = tuple(cg.procs_files())

    def start_vm(self) -> None:
        """Starts QEMU and joins the pod's tap to its network namespace."""
        ctx, record = self.ctx, self.record
        spec = VMSpec(
            name=record.vm_name,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            accel=ctx.accel,
            kernel=ctx.image.kernel,
            initrd=ctx.image.initrd,
            cmdline=ctx.image.cmdline(extra=self.cmdline_extra),
            root_disk=ctx.image.rootfs,
            shared_fs_socket=self._start_virtiofsd(),
            agent=self._channel,
            console_log=ctx.console_log(record.id),
            run_dir=ctx.run_dir(record.id),
            tb_cache_mib=ctx.config.hypervisor.tb_cache_mib,
            cgroup_procs=self._cgroup_procs,
            nic=record.network.nic() if record.network else None,
        )
        self._undo.append(("the VM", lambda: ctx.hypervisor.destroy(record.vm_name)))
        ctx.hypervisor.boot(spec)
        if record.network is not None:
            ctx.networking.attach(record.network)

    def connect_agent(self) -> None:
        """Waits for the agent; a guest that does not answer gives its console tail."""
        ctx, record = self.ctx, self.record
        self._undo.append(("the agent connection", lambda: ctx.drop_client(record.id)))
        client = ctx.client_for(record)

        def alive() -> bool:
            info = ctx.hypervisor.info(record.vm_name)
            return info is not None and info.running

        try:
            client.wait_ready(self.ready_timeout, alive)
        except (DeadlineExceeded, Unavailable) as e:
            console = ctx.console_log(record.id)
            raise type(e)(
                f"sandbox {record.id}: the guest agent did not become ready ({e}); "
                f"last lines of the console log {console}:\n{console_tail(ctx, record.id)}"
            ) from None

    def configure_guest(self) -> None:
        """Hostname, DNS, the NIC and the shared dir in the guest; then READY, with the overhead
        the sandbox costs right after boot."""
        ctx, record = self.ctx, self.record
        client = ctx.client_for(record)
        net = record.network
        files = client.create_sandbox(
            pb.CreateSandboxRequest(
                sandbox_id=record.id,
                hostname=record.hostname,
                dns=pb.DNSConfig(servers=self.dns.servers, searches=self.dns.searches, options=self.dns.options),
                storages=[pb.Storage(driver="virtiofs", source=SHARED_DIR_TAG, mount_point=GUEST_SHARE)],
                interfaces=net.guest_interfaces() if net else [],
                routes=net.guest_routes() if net else [],
                sysctls=dict(self.kernel.sysctls),
                share_pid_namespace=self.kernel.share_pid_namespace,
            )
        )
        record.guest_files = {
            "hostname": files.hostname_path,
            "hosts": files.hosts_path,
            "resolv.conf": files.resolv_conf_path,
        }
        # Guest paths, only ever handed back to the guest (in specs); an older agent has no shm.
        if files.shm_path:
            if not SHM_PATH.match(files.shm_path):
                raise AgentMisbehaved(f"the guest named its pod /dev/shm {files.shm_path[:80]!r}")
            record.guest_files["shm"] = files.shm_path
        if self.kernel.share_pid_namespace:
            # Only ever handed back to the guest (in specs), never opened here; checked all the same.
            if not PID_NAMESPACE_PATH.match(files.pid_namespace_path):
                raise AgentMisbehaved(f"the guest named its pod PID namespace {files.pid_namespace_path[:80]!r}")
            record.guest_files["pid_namespace"] = files.pid_namespace_path
        if client.violation is not None:
            # It broke the protocol while booting (a probe's answer, a stray frame): no pod on it.
            raise AgentMisbehaved(client.violation)
        move(record, SandboxState.READY)
        try:
            record.overhead_at_boot = probes.memory_snapshot(ctx, record, client.guest_details())
        except KvmSandboxError as e:
            log.warning("sandbox %s: could not measure its overhead at boot: %s", record.id, e)
        ctx.store.save(record)

    def _start_virtiofsd(self) -> Path:
        """The daemon serving the shared dir (in the VMM's cgroup); returns the socket QEMU connects to."""
        shared = self.ctx.sandbox_dir(self.record.id) / rootfs.SHARED
        socket_path = self.ctx.run_dir(self.record.id) / VIRTIOFSD_SOCKET
        self._undo.append(("the virtio-fs daemon", lambda: virtiofsd.stop(shared, socket_path.parent)))
        virtiofsd.start(shared, socket_path, self._cgroup_procs)
        return socket_path

    # -- undo --------------------------------------------------------------------------------

    def _release_network(self) -> None:
        """A failed create releases the network at once, namespace included: nothing would retry."""
        try:
            lifecycle.release_network(self.ctx, self.record, remove_netns=True, retry_later=False)
        except KvmSandboxError:
            self.ctx.networking.forget(self.record.id)
            raise

    def _remove_files(self, sdir: Path, run_dir: Path) -> None:
        self.ctx.store.forget(self.record.id)
        self.ctx.forget_lock(self.record.id)
        rootfs.remove_sandbox_dir(sdir)
        shutil.rmtree(run_dir, ignore_errors=True)

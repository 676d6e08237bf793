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
from kvmsandbox.errors import (
    AgentMisbehaved,
    DeadlineExceeded,
    FailedPrecondition,
    HypervisorError,
    KvmSandboxError,
    Unavailable,
)
from kvmsandbox.host.beneath import private_dir
from kvmsandbox.host.cgroups import HostCgroup
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.hypervisor.spec import SHARED_DIR_TAG, TEMPLATE_NIC_MAC, AgentChannel, TemplateRole, VMSpec
from kvmsandbox.hypervisor.template_store import CloneSource, TemplateUnusable
from kvmsandbox.sandbox import lifecycle, probes, rootfs
from kvmsandbox.sandbox.console import console_tail
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.states import SandboxState, move
from kvmsandbox.sandbox.templates import Templates
from kvmsandbox.sandbox.types import BootTimings, DnsConfig, NetworkRequest, PodKernel
from kvmsandbox.sandbox.warm_pool import WarmPool, WarmVM

log = logging.getLogger(__name__)

GUEST_SHARE = "/run/kvmsandbox/shared"
PID_NAMESPACE_PATH = re.compile(r"^/run/kvmsandbox/sandbox/pid-namespace\Z")
SHM_PATH = re.compile(r"^/run/kvmsandbox/sandbox/shm\Z")
VIRTIOFSD_SOCKET = "fs.sock"
# A clone's agent answers within a second of its restore (it was up when its template was saved);
# one that does not is given up for a cold boot well before a cold boot's own deadline.
CLONE_READY_SECONDS = 20.0


def cgroup_path(ctx: SandboxContext, sandbox_id: str, cgroup_parent: str) -> str:
    """Where the VMM is accounted; "" when the host has no usable cgroups."""
    if not ctx.cgroups_ok:
        return ""
    oc = ctx.config.overhead
    parent = oc.overhead_cgroup if oc.vmm_cgroup == "overhead" else (cgroup_parent or oc.default_cgroup_parent)
    return posixpath.normpath("/" + parent.strip("/") + f"/kvmsandbox-{sandbox_id[:16]}")


def _template_at_fault(error: KvmSandboxError) -> bool:
    """A clone failed because of its template (its state did not load, its guest did not answer),
    not because of the host (a uid, a cgroup): only then does the template rest."""
    if isinstance(error, DeadlineExceeded | Unavailable | AgentMisbehaved):
        return True
    return isinstance(error, HypervisorError) and any(w in str(error) for w in ("restore", "migration"))


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
        templates: Templates | None = None,
        warm_pool: WarmPool | None = None,
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
        self._templates = templates
        self._template: CloneSource | None = None
        self._pool = warm_pool
        self._warm: WarmVM | None = None
        self._requested_memory_mib = 0

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
        self._warm = self._take_warm()
        if self._warm is None:
            self._template = self._choose_template()
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
            adopt = self._warm.tap if self._warm is not None else ""
            record.network = ctx.networking.setup(record.id, self.network.port_mappings, self.network.args, adopt)
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

    def _take_warm(self) -> WarmVM | None:
        """A clone waiting in the warm pool for a pod of this size, or None."""
        record, templates, pool = self.record, self._templates, self._pool
        # Only pods with a network: a waiting clone's tap becomes the pod's (its QEMU holds it open).
        if templates is None or pool is None or self.cmdline_extra or self.network is None:
            return None
        size = templates.memory_class(record.memory_mib)
        vm = pool.take(record.vcpus, size) if size is not None else None
        if vm is None or size is None:
            return None
        self._undo.append(("the warm clone", lambda: pool.discard(vm)))
        self._requested_memory_mib = record.memory_mib
        record.memory_mib = size
        record.transport = "virtio-serial"
        record.shared_fs = "none"
        record.template = vm.key
        record.warm = True
        return vm

    def _choose_template(self) -> CloneSource | None:
        """What this pod is cloned from (its template built first when missing), or None: no
        template asked for, or none usable (said in a warning; the pod boots cold)."""
        record, templates = self.record, self._templates
        if templates is None:
            return None
        size = templates.memory_class(record.memory_mib)
        try:
            if self.cmdline_extra:
                raise TemplateUnusable("the pod needs kernel arguments of its own")
            if size is None:
                raise TemplateUnusable(f"{record.memory_mib} MiB is above the largest memory class")
            source = templates.clone_source(record.vcpus, size)
        except (TemplateUnusable, OSError) as e:
            log.warning("sandbox %s: booting cold, no VM template: %s", record.id, e)
            return None
        self._undo.append(("the template's fds", source.close))
        self._requested_memory_mib = record.memory_mib
        record.memory_mib = size
        record.transport = "virtio-serial"
        record.shared_fs = "none"
        record.template = source.key
        return source

    def start_vm(self) -> None:
        """Starts QEMU (a clone of the pod's template, or a cold boot when there is none or the
        clone fails) and joins the pod's tap to its network namespace."""
        started = False
        if self._warm is not None:
            try:
                self._start_warm(self._warm)
                started = True
            except KvmSandboxError as e:
                log.warning("sandbox %s: the warm clone failed, booting cold: %s", self.record.id, e)
                self._abandon_clone()
        elif self._template is not None:
            try:
                self._start_clone(self._template)
                started = True
            except KvmSandboxError as e:
                log.warning("sandbox %s: the clone of template %s failed, booting cold: %s",
                            self.record.id, self.record.template, e)  # fmt: skip
                if self._templates is not None and _template_at_fault(e):
                    self._templates.failed(self.record.template, str(e))
                self._abandon_clone()
            finally:
                self._template.close()  # QEMU has its own
        if not started:
            self._start_cold()
        # Only now does the tap leave the runtime's namespace: a cold boot after a failed clone
        # opens it again by name.
        if self.record.network is not None:
            self.ctx.networking.attach(self.record.network)

    def _start_clone(self, source: CloneSource) -> None:
        ctx, record = self.ctx, self.record
        spec = VMSpec(
            name=record.vm_name,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            accel=ctx.accel,
            kernel=ctx.image.kernel,
            initrd=ctx.image.initrd,
            cmdline=ctx.image.cmdline(),
            root_disk=ctx.image.rootfs,
            shared_fs_socket=None,
            agent=self._channel,
            console_log=ctx.console_log(record.id),
            run_dir=ctx.run_dir(record.id),
            tb_cache_mib=ctx.config.hypervisor.tb_cache_mib,
            cgroup_procs=self._cgroup_procs,
            nic=record.network.nic() if record.network else None,
            template=TemplateRole("clone", source.memory_fd, source.state_fd),
        )
        self._undo.append(("the VM", lambda: ctx.hypervisor.destroy(record.vm_name)))
        ctx.hypervisor.boot(spec)
        ctx.store.save(record)
        # A clone that restored but whose guest does not answer (its template's memory damaged,
        # say) is given up here, while a cold boot can still take its place.
        self._undo.append(("the agent connection", lambda: ctx.drop_client(record.id)))
        ctx.client_for(record).wait_ready(min(CLONE_READY_SECONDS, self.ready_timeout), self._vm_alive)

    def _start_warm(self, vm: WarmVM) -> None:
        """Gives a waiting clone the pod's names and cgroup; its agent answers already."""
        ctx, record = self.ctx, self.record
        assert self._pool is not None
        self._undo.append(("the VM", lambda: ctx.hypervisor.destroy(record.vm_name)))
        try:
            self._pool.adopt(vm, record.vm_name, ctx.run_dir(record.id), ctx.console_log(record.id))
        except OSError as e:
            raise FailedPrecondition(f"cannot give the warm clone the pod's files: {e.strerror}") from None
        # QEMU's pid as the backend knows it now (pid and start time): never a pid remembered.
        info = ctx.hypervisor.info(record.vm_name)
        if info is None or not info.running or info.pid is None:
            raise FailedPrecondition("the warm clone's QEMU is gone")
        for procs in self._cgroup_procs:
            try:
                procs.write_text(f"{info.pid}\n")
            except OSError as e:
                raise FailedPrecondition(
                    f"cannot move QEMU (pid {info.pid}) into {procs.parent}: {e.strerror}"
                ) from None
        ctx.store.save(record)
        self._undo.append(("the agent connection", lambda: ctx.drop_client(record.id)))
        ctx.client_for(record).wait_ready(min(CLONE_READY_SECONDS, self.ready_timeout), self._vm_alive)

    def _abandon_clone(self) -> None:
        """Undoes a failed clone's VM and agent connection; the pod boots cold after it, at the
        size it asked for."""
        ctx, record = self.ctx, self.record
        ctx.drop_client(record.id)
        ctx.hypervisor.destroy(record.vm_name)
        if self._warm is not None and self._pool is not None:
            self._pool.discard(self._warm)  # whatever was not renamed yet
        record.template = ""
        record.warm = False
        record.memory_mib = self._requested_memory_mib or record.memory_mib
        record.shared_fs = ctx.shared_fs
        record.transport = ctx.transport
        if record.transport == "vsock":
            record.guest_cid = 3 + secrets.randbelow(2**31 - 4)
            record.agent_socket = ""
            self._channel = AgentChannel(transport="vsock", socket_path=None, guest_cid=record.guest_cid)
        ctx.store.save(record)

    def _vm_alive(self) -> bool:
        info = self.ctx.hypervisor.info(self.record.vm_name)
        return info is not None and info.running

    def _start_cold(self) -> None:
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

    def connect_agent(self) -> None:
        """Waits for the agent; a guest that does not answer gives its console tail."""
        ctx, record = self.ctx, self.record
        self._undo.append(("the agent connection", lambda: ctx.drop_client(record.id)))
        client = ctx.client_for(record)
        try:
            client.wait_ready(self.ready_timeout, self._vm_alive)
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
        request = pb.CreateSandboxRequest(
            sandbox_id=record.id,
            hostname=record.hostname,
            dns=pb.DNSConfig(servers=self.dns.servers, searches=self.dns.searches, options=self.dns.options),
            interfaces=net.guest_interfaces() if net else [],
            routes=net.guest_routes() if net else [],
            sysctls=dict(self.kernel.sysctls),
            share_pid_namespace=self.kernel.share_pid_namespace,
        )
        if record.shared_fs != "none":
            request.storages.append(pb.Storage(driver="virtiofs", source=SHARED_DIR_TAG, mount_point=GUEST_SHARE))
        if record.template:
            request.clone.entropy = os.urandom(64)
            request.clone.realtime_unix_ns = time.time_ns()
            for iface in request.interfaces:
                iface.template_mac = TEMPLATE_NIC_MAC
        files = client.create_sandbox(request)
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

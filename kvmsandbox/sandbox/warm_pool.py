"""A warm pool: clones of the default-size VM template restored ahead, their agents answering,
waiting for no pod in particular (``templates.warm_pool``). A template handler's pod of that size
with a network takes one: the runtime renames its VM, run dir, console log and tap to the pod's, moves QEMU into
the pod's cgroup and only then sets the pod up in it (network, hostname, identity). A background
thread refills the pool; it does not fill, and gives back VMs, while the host's available memory is
below ``templates.warm_pool_min_available_mib``. The pool is drained when the server stops and
whatever a crash left of it is removed at the next start: waiting VMs belong to no pod.

A waiting VM's memory is charged to the server's cgroup until a pod takes it (the kernel does not
move charges with a process): what it wrote before then (~20 MiB) stays there.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from kvmsandbox.agent.client import AgentClient, serial_connector
from kvmsandbox.errors import KvmSandboxError
from kvmsandbox.host import proc
from kvmsandbox.hypervisor.spec import TEMPLATE_NIC_MAC, AgentChannel, Nic, TemplateRole, VMSpec
from kvmsandbox.hypervisor.template_store import TemplateUnusable
from kvmsandbox.network.pod import delete_link, make_tap
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.templates import Templates

log = logging.getLogger(__name__)

WARM_VM_PREFIX = "kvsb-warm-"
WARM_RUN_PREFIX = "w-"
WARM_TAP_PREFIX = "kvw"
AGENT_SOCKET = "agent.sock"
# Seconds between looks at the pool when nothing wakes the filler, and after a failed fill.
POLL_SECONDS = 2.0
FAILURE_PAUSE = 30.0
READY_SECONDS = 20.0


class _Adopter(Protocol):
    def adopt(self, name: str, new_name: str, run_dir: Path) -> None: ...


@dataclass(frozen=True)
class WarmVM:
    """A restored clone waiting for a pod: its pool names and what it was cloned from."""

    id: str
    key: str
    vcpus: int
    memory_mib: int
    pid: int

    @property
    def name(self) -> str:
        return f"{WARM_VM_PREFIX}{self.id}"

    @property
    def tap(self) -> str:
        return f"{WARM_TAP_PREFIX}{self.id}"


class WarmPool:
    """Up to ``templates.warm_pool`` waiting clones of the default-size template."""

    def __init__(self, ctx: SandboxContext, templates: Templates) -> None:
        self.ctx = ctx
        self.templates = templates
        config = ctx.config
        self.size = config.templates.warm_pool
        self.vcpus = config.sandbox.vcpus
        self.memory_mib = templates.memory_class(config.sandbox.memory_mib) or 0
        self.min_available = config.templates.warm_pool_min_available_mib << 20
        self.dir = config.state_dir / "warm"
        self._ready: list[WarmVM] = []
        self._stale: list[WarmVM] = []  # out of the pool, destroyed by the filler
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_problem = ""

    def run_dir(self, vm_id: str) -> Path:
        return self.ctx.config.run_dir / f"{WARM_RUN_PREFIX}{vm_id}"

    def console(self, vm_id: str) -> Path:
        return self.dir / f"{vm_id}.console"

    # -- the pod side ------------------------------------------------------------------------

    def take(self, vcpus: int, memory_mib: int) -> WarmVM | None:
        """A waiting clone for a pod of that size (the pool's size), of today's template and
        still running, or None; the pool refills behind it. Clones of a template that changed
        since (a new guest image) go to the filler to be destroyed."""
        if (vcpus, memory_mib) != (self.vcpus, self.memory_mib):
            return None
        try:
            key = self.templates.current_key(self.vcpus, self.memory_mib)
        except TemplateUnusable:
            return None
        found = None
        with self._lock:
            while self._ready and found is None:
                vm = self._ready.pop(0)
                if vm.key == key and self._running(vm.name):
                    found = vm
                else:
                    self._stale.append(vm)
        self._wake.set()
        return found

    def adopt(self, vm: WarmVM, vm_name: str, run_dir: Path, console: Path) -> None:
        """Renames what ``vm`` has to a sandbox's names (its tap is renamed by the pod network).

        Raises HypervisorError (the caller destroys the VM under both names).
        """
        cast(_Adopter, self.ctx.hypervisor).adopt(vm.name, vm_name, run_dir)
        with contextlib.suppress(FileNotFoundError):
            self.console(vm.id).replace(console)

    def discard(self, vm: WarmVM) -> None:
        """Destroys a clone that left the pool but serves no pod. Raises nothing."""
        self._remove(vm.id)

    # -- the filler --------------------------------------------------------------------------

    def start(self) -> None:
        """Fills the pool in the background (once; ``clean_up`` first removed what an earlier
        run left)."""
        if self.size <= 0 or not self.memory_mib or self._thread is not None:
            return
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._fill, name="warm-pool", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            self._destroy_stale()
            pause = POLL_SECONDS
            try:
                available = proc.mem_available()
                floor = self.min_available
                roomy = available is None or available >= floor + (self.memory_mib << 20)
                if available is not None and available < floor:
                    self.last_problem = f"host memory available {available >> 20} MiB is below the pool's floor"
                    self._give_back_one()
                # A clone's worth above the floor before adding one: no add-and-give-back swing.
                elif len(self._ready) < self.size and roomy:
                    self._add_one()
                    pause = 0.0
            except Exception as e:  # the filler must outlive any one failure
                self.last_problem = str(e)[:500]
                log.warning("warm pool: cannot restore a clone: %s", e)
                self._stop.wait(FAILURE_PAUSE)
                continue
            if pause:
                self._wake.wait(pause)
                self._wake.clear()

    def _destroy_stale(self) -> None:
        with self._lock:
            stale, self._stale = self._stale, []
        for vm in stale:
            self._remove(vm.id)

    def _give_back_one(self) -> None:
        with self._lock:
            vm = self._ready.pop() if self._ready else None
        if vm is not None:
            log.info("warm pool: memory is short, a waiting clone goes id=%s", vm.id)
            self._remove(vm.id)

    def _add_one(self) -> None:
        """Restores one clone and waits for its agent. Raises TemplateUnusable, KvmSandboxError."""
        ctx, vm_id = self.ctx, secrets.token_hex(6)
        source = self.templates.clone_source(self.vcpus, self.memory_mib)
        name, run_dir = f"{WARM_VM_PREFIX}{vm_id}", self.run_dir(vm_id)
        try:
            # The run dir first: a crash from here on leaves it, and clean_up finds the id by it.
            run_dir.mkdir(mode=0o711, parents=True)
            run_dir.chmod(0o711)
            make_tap(f"{WARM_TAP_PREFIX}{vm_id}")
            spec = VMSpec(
                name=name,
                vcpus=self.vcpus,
                memory_mib=self.memory_mib,
                accel=ctx.accel,
                kernel=ctx.image.kernel,
                initrd=ctx.image.initrd,
                cmdline=ctx.image.cmdline(),
                root_disk=ctx.image.rootfs,
                shared_fs_socket=None,
                agent=AgentChannel(transport="virtio-serial", socket_path=run_dir / AGENT_SOCKET),
                console_log=self.console(vm_id),
                run_dir=run_dir,
                tb_cache_mib=ctx.config.hypervisor.tb_cache_mib,
                nic=Nic(tap=f"{WARM_TAP_PREFIX}{vm_id}", mac=TEMPLATE_NIC_MAC),
                template=TemplateRole("clone", source.memory_fd, source.state_fd),
            )
            info = ctx.hypervisor.boot(spec)
            client = AgentClient(serial_connector(run_dir / AGENT_SOCKET), f"warm clone {vm_id}", default_timeout=5.0)
            try:
                client.wait_ready(READY_SECONDS, lambda: self._running(name))
            finally:
                client.close()
        except BaseException:
            self._remove(vm_id)  # the filler pauses; pods of the template still clone on demand
            raise
        finally:
            source.close()
        vm = WarmVM(vm_id, source.key, self.vcpus, self.memory_mib, info.pid or 0)
        with self._lock:
            kept = not self._stop.is_set()
            if kept:
                self._ready.append(vm)
        if not kept:  # drained meanwhile
            self._remove(vm.id)
            return
        self.last_problem = ""
        log.info("warm pool: clone waiting id=%s ready=%d/%d", vm.id, len(self._ready), self.size)

    def _running(self, name: str) -> bool:
        info = self.ctx.hypervisor.info(name)
        return info is not None and info.running

    def _remove(self, vm_id: str) -> None:
        """Everything of one waiting clone, whatever exists of it. Raises nothing."""
        try:
            self.ctx.hypervisor.destroy(f"{WARM_VM_PREFIX}{vm_id}")
        except KvmSandboxError as e:
            log.warning("warm pool: cannot destroy clone %s: %s", vm_id, e)
        with contextlib.suppress(KvmSandboxError):
            delete_link(f"{WARM_TAP_PREFIX}{vm_id}")
        shutil.rmtree(self.run_dir(vm_id), ignore_errors=True)
        self.console(vm_id).unlink(missing_ok=True)

    # -- start, stop, status -----------------------------------------------------------------

    def drain(self) -> None:
        """Stops the filler and destroys every waiting clone (the server stops)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(READY_SECONDS + 30)
        with self._lock:
            waiting, self._ready = self._ready + self._stale, []
            self._stale = []
        for vm in waiting:
            self._remove(vm.id)

    def clean_up(self) -> None:
        """What a crash left of the pool: its VMs, run dirs, console logs and taps. Raises nothing."""
        ids: set[str] = set()
        with contextlib.suppress(KvmSandboxError):
            ids |= {
                i.name[len(WARM_VM_PREFIX) :] for i in self.ctx.hypervisor.list() if i.name.startswith(WARM_VM_PREFIX)
            }
        ids |= {p.name[len(WARM_RUN_PREFIX) :] for p in self.ctx.config.run_dir.glob(f"{WARM_RUN_PREFIX}*")}
        ids |= {p.stem for p in self.dir.glob("*.console")}
        for vm_id in ids:
            if vm_id and all(c in "0123456789abcdef" for c in vm_id):
                self._remove(vm_id)

    def status(self) -> dict[str, Any]:
        """The pool as the node's overhead shows it: size, waiting clones, their host memory (PSS)."""
        with self._lock:
            waiting = list(self._ready)
        pss = 0
        for vm in waiting:
            with contextlib.suppress(KvmSandboxError):
                pss += proc.vmm_memory(vm.pid, vm.memory_mib << 20).pss
        return {
            "size": self.size,
            "waiting": len(waiting),
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "pss_bytes": pss,
            "problem": self.last_problem,
        }


def wait_filled(pool: WarmPool, timeout: float) -> bool:
    """True once the pool holds its size (for tests and benchmarks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pool.status()["waiting"] >= pool.size:
            return True
        time.sleep(0.1)
    return False

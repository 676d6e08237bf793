"""VM templates for the pods of the handlers that ask for them (``templates.handlers``).

A template is a guest booted once to the point where its agent answers, before anything of a pod
is in it, then saved (qemu backend: RAM in a memfd, device state in a file; see
``hypervisor.template_store``). A pod of such a handler is a clone: QEMU restores the saved state
with the template's RAM mapped copy-on-write, so clones share every page they did not write.

Size classes: a template has a fixed vCPU count and memory size, so a pod's VM memory is rounded up
to the smallest of ``templates.memory_classes_mib`` that holds it (vCPUs are kept as sized: one
template per vCPU count and class). Memory a guest never touches costs the host nothing in a
clone, so rounding up costs the guest's page tables (about 0.2% of the size) and a larger view in
the guest; a pod larger than the largest class boots cold.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from kvmsandbox.agent.client import AgentClient, serial_connector
from kvmsandbox.errors import FailedPrecondition, KvmSandboxError
from kvmsandbox.hypervisor.accel import Accel
from kvmsandbox.hypervisor.builder import MACHINE, QemuFds, qemu_argv
from kvmsandbox.hypervisor.spec import AgentChannel, TemplateRole, VMSpec
from kvmsandbox.hypervisor.template_store import (
    CloneSource,
    LoadedTemplate,
    TemplateInfo,
    TemplateStore,
    TemplateUnusable,
    file_identity,
    new_memory,
    template_key,
)
from kvmsandbox.sandbox.context import SandboxContext

log = logging.getLogger(__name__)

SIZE_INPUTS = ("vcpus", "memory_mib")
"""The inputs that differ between the templates of one node; every other input is the same for all
current templates, and a template whose others differ is stale."""
# Seconds the agent gets to see the template builder hang up before the VM is stopped.
HANG_UP_SECONDS = 0.2
# Seconds a template that failed to build, load or clone is left alone (its pods boot cold).
FAILURE_BACKOFF = 60.0
TEMPLATE_VM_PREFIX = "kvsb-template-"
TEMPLATE_RUN_PREFIX = "t-"
# What QEMU loads into a q35 guest with our devices: a change of any makes restores fail.
FIRMWARE = (
    Path("/usr/share/seabios/bios-256k.bin"),
    Path("/usr/lib/ipxe/qemu/efi-virtio.rom"),
    Path("/usr/share/qemu/kvmvapic.bin"),
    Path("/usr/share/qemu/linuxboot_dma.bin"),
)


def firmware_identity(files: tuple[Path, ...] = FIRMWARE) -> str:
    """The identities of the firmware files that exist (see ``file_identity``)."""
    found = [f"{f.resolve()}@{file_identity(f.resolve())}" for f in files if f.exists()]
    return hashlib.sha256("\n".join(found).encode()).hexdigest()[:16]


def host_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host kernel and CPU (model, flags, microcode): a guest kernel saved on one patched
    itself for that CPU, and a restore on another may fail or run with the wrong mitigations."""
    try:
        first = cpuinfo.read_text(errors="replace")[:65536].split("\n\n", 1)[0]
    except OSError:
        first = ""
    wanted = ("vendor_id", "cpu family", "model", "model name", "stepping", "microcode", "flags")
    lines = sorted(line for line in first.splitlines() if line.split(":", 1)[0].strip() in wanted)
    return hashlib.sha256("\n".join([os.uname().release, *lines]).encode()).hexdigest()[:16]


def device_digest(accel: Accel, tb_cache_mib: int) -> str:
    """A digest of the QEMU command line a template gets (size, paths and fd numbers fixed): a
    change of the devices the runtime gives a VM names other templates."""
    spec = VMSpec(
        name="template",
        vcpus=1,
        memory_mib=256,
        accel=accel,
        kernel=Path("/k"),
        initrd=Path("/i"),
        cmdline="",
        root_disk=Path("/r"),
        shared_fs_socket=None,
        agent=AgentChannel(transport="virtio-serial", socket_path=Path("/a")),
        console_log=Path("/c"),
        run_dir=Path("/d"),
        tb_cache_mib=tb_cache_mib,
        template=TemplateRole("build", 3),
    )
    fds = QemuFds(qmp=4, console=5, root_disk=6, kernel="/k", initrd="/i", agent=7, memory=8)
    return hashlib.sha256(" ".join(qemu_argv(spec, fds, binary="qemu")).encode()).hexdigest()[:16]


class _Saver(Protocol):
    def save_state(self, name: str, state_path: Path) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Listed:
    info: TemplateInfo | None
    key: str
    stale: bool


class Templates:
    """Builds, loads (once per server) and lists the node's templates.

    Bounded: templates exist only for the configured vCPU counts and memory classes; each size has
    a lock of its own (a build of one size holds no pod of another); a template that failed to
    build, load or clone is not tried again for FAILURE_BACKOFF seconds (its pods boot cold).
    """

    def __init__(self, ctx: SandboxContext) -> None:
        self.ctx = ctx
        self.store = TemplateStore(ctx.config.state_dir / "templates")
        self.classes = sorted(ctx.config.templates.memory_classes_mib)
        self.vcpus = sorted(ctx.config.templates.vcpus)
        self._loaded: dict[str, LoadedTemplate] = {}
        # key -> (resting until, why, the template on disk when it failed)
        self._failed: dict[str, tuple[float, str, TemplateInfo | None]] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def supported(self) -> bool:
        return self.ctx.hypervisor.capabilities.snapshot_restore

    def memory_class(self, memory_mib: int) -> int | None:
        """The smallest class that holds ``memory_mib``, or None when none does."""
        return next((c for c in self.classes if c >= memory_mib), None)

    def inputs(self, vcpus: int, memory_mib: int) -> dict[str, str]:
        """What a template's saved state depends on. Raises TemplateUnusable (a file is unreadable)."""
        ctx = self.ctx
        qemu = Path(shutil.which(ctx.config.hypervisor.qemu_binary) or ctx.config.hypervisor.qemu_binary).resolve()
        return {
            "kernel": file_identity(ctx.image.kernel),
            "initrd": file_identity(ctx.image.initrd),
            "rootfs": file_identity(ctx.image.rootfs),
            "image": ctx.image.key,
            "cmdline": ctx.image.cmdline(),
            "qemu": f"{qemu}@{file_identity(qemu)}",
            "firmware": firmware_identity(),
            "host": host_identity(),
            "devices": device_digest(ctx.accel, ctx.config.hypervisor.tb_cache_mib),
            "backend": ctx.hypervisor.name,
            "accel": ctx.accel,
            "tb_cache_mib": str(ctx.config.hypervisor.tb_cache_mib),
            "machine": MACHINE,
            "vcpus": str(vcpus),
            "memory_mib": str(memory_mib),
        }

    def current_key(self, vcpus: int, memory_mib: int) -> str:
        """The name the template of that size has today. Raises TemplateUnusable."""
        return template_key(self.inputs(vcpus, memory_mib))

    def clone_source(self, vcpus: int, memory_mib: int) -> CloneSource:
        """What one clone of the template of that size needs, its own fds (the caller closes them);
        the template is built first when there is none.

        Raises:
            TemplateUnusable: no template for that vCPU count, or it cannot be built or loaded, or
            it failed within FAILURE_BACKOFF seconds (the caller boots cold).
        """
        if not self.supported:
            raise TemplateUnusable(f"the {self.ctx.hypervisor.name} backend cannot restore VM templates")
        if vcpus not in self.vcpus:
            raise TemplateUnusable(f"no template has {vcpus} vCPUs (templates.vcpus: {self.vcpus})")
        key = template_key(self.inputs(vcpus, memory_mib))
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            failed = self._failed.get(key)
            # Resting, unless the template on disk is another one now (removed, or built again).
            if failed is not None and time.monotonic() < failed[0] and self.store.info(key) == failed[2]:
                raise TemplateUnusable(f"template {key} failed recently: {failed[1]}")
            try:
                loaded = self._current(key, vcpus, memory_mib)
                return loaded.source()
            except (TemplateUnusable, OSError) as e:
                self._failed[key] = (time.monotonic() + FAILURE_BACKOFF, str(e)[:500], self.store.info(key))
                raise TemplateUnusable(str(e)) from None

    def _current(self, key: str, vcpus: int, memory_mib: int) -> LoadedTemplate:
        """The loaded template of ``key`` as it is on disk now (rebuilt or reloaded when the one on
        disk is missing or another than the one loaded). Call with the key's lock held."""
        on_disk = self.store.info(key)
        with self._lock:
            loaded = self._loaded.get(key)
        if loaded is not None and on_disk == loaded.info:
            return loaded
        if loaded is not None:
            self._drop(key)
        if on_disk is None:
            self.build(vcpus, memory_mib)
        fresh = self.store.load(key)
        with self._lock:
            self._loaded[key] = fresh
        return fresh

    def failed(self, key: str, reason: str) -> None:
        """A clone of ``key`` failed: the loaded copy is dropped and the template rests."""
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:  # no clone_source of that key is copying the fds being closed
            self._drop(key)
            self._failed[key] = (time.monotonic() + FAILURE_BACKOFF, reason[:500], self.store.info(key))

    def _drop(self, key: str) -> None:
        with self._lock:
            loaded = self._loaded.pop(key, None)
        if loaded is not None:
            loaded.close()  # clones being started hold fds of their own

    def build(self, vcpus: int, memory_mib: int) -> TemplateInfo:
        """Boots a template VM of that size, waits for its agent, saves it. A template that exists
        is kept (returned as it is).

        Raises:
            TemplateUnusable: the template VM did not boot, its agent did not answer, or saving failed.
        """
        inputs = self.inputs(vcpus, memory_mib)
        key = template_key(inputs)
        started = time.monotonic()
        with self.store.locked():
            existing = self.store.info(key)
            if existing is not None:
                return existing
            work = self.store.root / f".build-{key}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(mode=0o700)
            memory = new_memory(memory_mib, key)
            try:
                self._boot_and_save(key, vcpus, memory_mib, memory, work)
                info = self.store.install(key, inputs, memory, memory_mib, work / "state")
            except (KvmSandboxError, OSError) as e:
                raise TemplateUnusable(
                    f"template for {vcpus} vCPUs and {memory_mib} MiB could not be built: {e}"
                ) from e
            finally:
                with contextlib.suppress(OSError):
                    os.close(memory)
                shutil.rmtree(work, ignore_errors=True)
        log.info(
            "template built key=%s vcpus=%d memory_mib=%d data_mib=%.1f seconds=%.2f",
            key, vcpus, memory_mib, info.data_bytes / 2**20, time.monotonic() - started,
        )  # fmt: skip
        return info

    def _boot_and_save(self, key: str, vcpus: int, memory_mib: int, memory: int, work: Path) -> None:
        ctx = self.ctx
        name = f"{TEMPLATE_VM_PREFIX}{key[:12]}"
        run_dir = ctx.config.run_dir / f"{TEMPLATE_RUN_PREFIX}{key[:14]}"
        ctx.hypervisor.destroy(name)  # one a crashed build left
        run_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        socket = run_dir / "agent.sock"
        spec = VMSpec(
            name=name,
            vcpus=vcpus,
            memory_mib=memory_mib,
            accel=ctx.accel,
            kernel=ctx.image.kernel,
            initrd=ctx.image.initrd,
            cmdline=ctx.image.cmdline(),
            root_disk=ctx.image.rootfs,
            shared_fs_socket=None,
            agent=AgentChannel(transport="virtio-serial", socket_path=socket),
            console_log=work / "console.log",
            run_dir=run_dir,
            tb_cache_mib=ctx.config.hypervisor.tb_cache_mib,
            template=TemplateRole("build", memory),
        )
        try:
            ctx.hypervisor.boot(spec)
            client = AgentClient(serial_connector(socket), f"template {key}", default_timeout=5.0)
            try:
                client.wait_ready(ctx.config.agent.ready_timeout_seconds, lambda: self._running(name))
            finally:
                client.close()
            time.sleep(HANG_UP_SECONDS)
            cast(_Saver, ctx.hypervisor).save_state(name, work / "state")
        finally:
            ctx.hypervisor.destroy(name)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _running(self, name: str) -> bool:
        info = self.ctx.hypervisor.info(name)
        return info is not None and info.running

    def listed(self) -> list[Listed]:
        """Every template on disk; ``stale`` when built from another image, kernel, QEMU or setting."""
        current = {k: v for k, v in self.inputs(1, self.classes[0]).items() if k not in SIZE_INPUTS}
        out = []
        for item in self.store.list():
            if isinstance(item, str):
                out.append(Listed(None, item, True))
                continue
            others = {k: v for k, v in item.inputs.items() if k not in SIZE_INPUTS}
            out.append(Listed(item, item.key, others != current))
        return out

    def remove(self, key: str) -> bool:
        """Removes a template (running clones keep their memory). Raises FailedPrecondition."""
        with self.store.locked():
            try:
                return self.store.remove(key)
            except OSError as e:
                raise FailedPrecondition(f"cannot remove template {key}: {e}") from None

    def prune_stale(self) -> list[str]:
        """Removes stale templates (clones of them keep running); returns their keys. Raises nothing."""
        removed = []
        for item in self.listed():
            if item.stale:
                with contextlib.suppress(FailedPrecondition):
                    if self.remove(item.key):
                        removed.append(item.key)
        return removed

    def clean_up(self) -> None:
        """At start: what a build that crashed left (its VM, work dirs, run dir), and stale
        templates. Raises nothing (logs what it could not remove)."""
        try:
            with self.store.locked():  # no build runs meanwhile (another process's either)
                for info in self.ctx.hypervisor.list():
                    if info.name.startswith(TEMPLATE_VM_PREFIX):
                        self.ctx.hypervisor.destroy(info.name)
                for leftover in [*self.store.root.glob(".build-*"), *self.store.root.glob(".new-*")]:
                    shutil.rmtree(leftover, ignore_errors=True)
                for run_dir in self.ctx.config.run_dir.glob(f"{TEMPLATE_RUN_PREFIX}*"):
                    shutil.rmtree(run_dir, ignore_errors=True)
        except (KvmSandboxError, OSError) as e:
            log.warning("cannot clean up after VM template builds: %s", e)
        try:
            removed = self.prune_stale()
        except KvmSandboxError as e:
            log.warning("cannot remove stale VM templates: %s", e)
            return
        if removed:
            log.info("stale VM templates removed: %s", ", ".join(removed))

    def close(self) -> None:
        """Closes the loaded templates, each under its lock (no clone is copying its fds)."""
        with self._lock:
            keys = list(self._loaded)
        for key in keys:
            with self._lock:
                lock = self._key_locks.setdefault(key, threading.Lock())
            with lock:
                self._drop(key)

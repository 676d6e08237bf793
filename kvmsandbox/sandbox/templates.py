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
from kvmsandbox.hypervisor.builder import MACHINE
from kvmsandbox.hypervisor.spec import AgentChannel, TemplateRole, VMSpec
from kvmsandbox.hypervisor.template_store import (
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


class _Saver(Protocol):
    def save_state(self, name: str, state_path: Path) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Listed:
    info: TemplateInfo | None
    key: str
    stale: bool


class Templates:
    """Builds, loads (once per server) and lists the node's templates."""

    def __init__(self, ctx: SandboxContext) -> None:
        self.ctx = ctx
        self.store = TemplateStore(ctx.config.state_dir / "templates")
        self.classes = sorted(ctx.config.templates.memory_classes_mib)
        self._loaded: dict[str, LoadedTemplate] = {}
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
        qemu = shutil.which(ctx.config.hypervisor.qemu_binary) or ctx.config.hypervisor.qemu_binary
        return {
            "kernel": file_identity(ctx.image.kernel),
            "initrd": file_identity(ctx.image.initrd),
            "rootfs": file_identity(ctx.image.rootfs),
            "image": ctx.image.key,
            "cmdline": ctx.image.cmdline(),
            "qemu": f"{Path(qemu).resolve()}@{file_identity(Path(qemu).resolve())}",
            "backend": ctx.hypervisor.name,
            "accel": ctx.accel,
            "tb_cache_mib": str(ctx.config.hypervisor.tb_cache_mib),
            "machine": MACHINE,
            "vcpus": str(vcpus),
            "memory_mib": str(memory_mib),
        }

    def get(self, vcpus: int, memory_mib: int, *, build: bool = True) -> LoadedTemplate:
        """The template for that size, loaded; built first when there is none (and ``build``).

        Raises:
            TemplateUnusable: it cannot be built or loaded (the caller boots cold).
        """
        if not self.supported:
            raise TemplateUnusable(f"the {self.ctx.hypervisor.name} backend cannot restore VM templates")
        key = template_key(self.inputs(vcpus, memory_mib))
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None and self.store.info(key) is not None:
                return loaded
            if loaded is not None:  # removed with `template rm`: rebuilt below
                loaded.close()
                del self._loaded[key]
            if self.store.info(key) is None:
                if not build:
                    raise TemplateUnusable(f"no template for {vcpus} vCPUs and {memory_mib} MiB")
                self.build(vcpus, memory_mib)
            loaded = self.store.load(key)
            self._loaded[key] = loaded
            return loaded

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
        name = f"kvsb-template-{key[:12]}"
        run_dir = ctx.config.run_dir / f"t-{key[:14]}"
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
        current = {k: v for k, v in self.inputs(1, 1).items() if k not in SIZE_INPUTS}
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

    def close(self) -> None:
        with self._lock:
            for loaded in self._loaded.values():
                loaded.close()
            self._loaded.clear()

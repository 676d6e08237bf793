"""Container root filesystems as disks: the host side.

Each image layer directory becomes a read-only erofs image once (``<layer dir>.erofs``, next to
it: the image store deletes it with the layer) and is attached to a pod's VM the first time a
container of the pod uses it, at a SCSI target the sandbox record keeps (``layer_disks``), and
stays attached while the pod lives (the next container of the image needs no hotplug) unless the
pod runs short of targets. Each container gets a writable layer: a sparse file holding an
empty ext4 filesystem, made here (``<sandbox dir>/disks/<container id>.ext4``, mode 0600, in a
directory no guest can write), attached at its own target and deleted with the container. The
agent mounts them and builds the overlay inside the guest. The host never mounts, opens as a
directory or parses what a guest wrote: the writable layer is a file whose allocated blocks are
all the host reads of it (ContainerStats).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.errors import FailedPrecondition, HypervisorError, InvalidArgument, ResourceExhausted
from kvmsandbox.hypervisor.disks import MAX_TARGET, MIN_TARGET, Disk
from kvmsandbox.image.blocks import erofs_image
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.records import SandboxRecord

log = logging.getLogger(__name__)

DISKS_DIR = "disks"
MKFS_TIMEOUT = 600.0  # seconds


@dataclass(frozen=True)
class Layer:
    """An image layer: its key in the sandbox record and its erofs image."""

    key: str
    image: Path


def layers_of(lower_dirs: Sequence[Path]) -> list[Layer]:
    """The erofs images of ``lower_dirs`` (top first), keyed by the layer directory's real path.

    Raises:
        InvalidArgument: no layer, or one is missing. FailedPrecondition: mkfs.erofs failed.
    """
    if not lower_dirs:
        raise InvalidArgument("a container rootfs needs at least one image layer")
    return [Layer(os.path.realpath(d), erofs_image(Path(d))) for d in lower_dirs]


def writable_path(ctx: SandboxContext, sandbox_id: str, container_id: str) -> Path:
    return ctx.sandbox_dir(sandbox_id) / DISKS_DIR / f"{container_id}.ext4"


def make_writable(path: Path, size_mib: int) -> int:
    """Creates the sparse file ``path`` (0600) holding an empty ext4 filesystem of ``size_mib``;
    returns the bytes it has allocated (what a fresh layer costs, subtracted in stats).

    Raises:
        FailedPrecondition: the file or mkfs.ext4 failed.
    """
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        # A file there is a leftover of a create cut short (the container is not recorded): replaced.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size_mib << 20)
        finally:
            os.close(fd)
        # Inode tables and the journal are left uninitialised (the guest mounts with noinit_itable):
        # a 10 GiB layer allocates about 4 MiB and takes milliseconds to make.
        argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-m", "0", str(path)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=MKFS_TIMEOUT, check=False)
        if result.returncode != 0:
            raise FailedPrecondition(f"cannot make the writable layer {path}: {result.stderr.strip()[-500:]}")
        return allocated_bytes(path)
    except (OSError, subprocess.TimeoutExpired) as e:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise FailedPrecondition(f"cannot make the writable layer {path}: {e}") from None


def allocated_bytes(path: Path) -> int:
    """What the file holds on the host's disk (0 when it is gone). Raises nothing."""
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0


def free_targets(record: SandboxRecord, count: int) -> list[int]:
    """``count`` SCSI targets no layer or container of the sandbox uses, the first free ones after
    the last handed out (round robin: a target freed a moment ago, whose disk the guest may not
    have seen go yet, is the last to be reused). Updates ``record.last_target``.

    Raises:
        ResourceExhausted: the VM's controller has no more.
    """
    used = set(record.layer_disks.values()) | {c.writable_target for c in record.containers.values()}
    span = MAX_TARGET - MIN_TARGET + 1
    order = [MIN_TARGET + (record.last_target - MIN_TARGET + 1 + i) % span for i in range(span)]
    free = [t for t in order if t not in used][:count]
    if len(free) < count:
        raise ResourceExhausted(
            f"sandbox {record.id} has no room for {count} more disks ({len(used)} of {MAX_TARGET} attached)"
        )
    record.last_target = free[-1]
    return free


def attach_layers(ctx: SandboxContext, record: SandboxRecord, layers: list[Layer]) -> list[int]:
    """The targets of ``layers`` in the sandbox's VM, attaching those not attached yet. A new
    target is recorded (and the record saved) before its disk is attached, so a crash in between
    leaves a record that removal finds.

    Raises:
        ResourceExhausted: no free target. HypervisorError: the VMM refused.
    """
    new = [layer for layer in dict.fromkeys(layers) if layer.key not in record.layer_disks]
    if new:
        for layer, target in zip(new, free_targets(record, len(new)), strict=True):
            record.layer_disks[layer.key] = target
        ctx.store.save(record)
        for layer in new:
            ctx.hypervisor.attach_disk(record.vm_name, Disk(record.layer_disks[layer.key], layer.image, readonly=True))
    return [record.layer_disks[layer.key] for layer in layers]


# Unused layer disks stay attached (the pod's next container of the same image then needs no
# hotplug) until fewer targets than this are free.
SPARE_TARGETS = 32


def release_layers(ctx: SandboxContext, record: SandboxRecord, keep_container: str = "") -> None:
    """Detaches the layers no container of the sandbox uses any more (``keep_container`` aside, one
    being removed) once fewer than SPARE_TARGETS targets are free, and forgets them; the caller
    saves the record. Raises nothing: a VM that is gone has no disks left."""
    containers = [c for c in record.containers.values() if c.id != keep_container]
    used = {key for c in containers for key in c.layer_keys}
    taken = len(record.layer_disks) + sum(1 for c in containers if c.writable_target)
    if MAX_TARGET - MIN_TARGET + 1 - taken >= SPARE_TARGETS:
        return
    for key, target in list(record.layer_disks.items()):
        if key not in used:
            detach(ctx, record, target)
            del record.layer_disks[key]


def detach(ctx: SandboxContext, record: SandboxRecord, target: int) -> None:
    """Detaches one disk; a failure is logged (the VM may be gone, its disks with it)."""
    try:
        ctx.hypervisor.detach_disk(record.vm_name, target)
    except HypervisorError as e:
        log.warning("sandbox %s: cannot detach disk %d: %s", record.id, target, e)


def remove_writable(ctx: SandboxContext, record: SandboxRecord, container_id: str, target: int) -> None:
    """Detaches the container's writable layer (when it has one) and deletes its file. Raises nothing."""
    if target:
        detach(ctx, record, target)
    with contextlib.suppress(FileNotFoundError):
        writable_path(ctx, record.id, container_id).unlink()

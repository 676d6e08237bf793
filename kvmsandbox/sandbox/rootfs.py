"""Container root filesystems on the host: an overlay of read-only image layers and a writable
per-container layer, mounted below the sandbox's shared dir so the guest sees it over 9p."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from kvmsandbox.agent.linux import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    mount,
    mount_points_below,
    umount,
)
from kvmsandbox.errors import FailedPrecondition, InvalidArgument

# What a guest writes through 9p lands on the host with real owners and modes (QEMU runs the 9p
# server as root, security_model=passthrough). A device node or setuid binary a guest creates
# there must stay inert for host processes: every mount a guest can write to is nodev and nosuid.
GUEST_WRITABLE_FLAGS = MS_NODEV | MS_NOSUID


def seal_shared_dir(path: Path) -> None:
    """Makes ``path`` a nodev, nosuid bind mount of itself before a guest gets it over 9p.

    Raises:
        FailedPrecondition: the kernel refused (its reason in the message).
    """
    try:
        mount(str(path), str(path), "", MS_BIND)
        mount(str(path), str(path), "", MS_BIND | MS_REMOUNT | GUEST_WRITABLE_FLAGS)
    except OSError as e:
        raise FailedPrecondition(f"cannot prepare the shared dir {path}: {e.strerror}") from None


def mount_rootfs(lower_dirs: Sequence[Path], layer_dir: Path, target: Path) -> None:
    """Mounts ``lower_dirs`` (top first, read-only) under a writable layer in ``layer_dir`` at ``target``.

    Raises:
        InvalidArgument: no lower dir, or one is missing.
        FailedPrecondition: the kernel refused the overlay mount (its reason in the message).
    """
    if not lower_dirs:
        raise InvalidArgument("a container rootfs needs at least one image layer")
    for d in lower_dirs:
        if not d.is_dir():
            raise InvalidArgument(f"image layer {d} does not exist")
    upper, work = layer_dir / "upper", layer_dir / "work"
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    lowers = ":".join(str(d) for d in lower_dirs)
    try:
        mount(
            "overlay",
            str(target),
            "overlay",
            GUEST_WRITABLE_FLAGS,
            f"lowerdir={lowers},upperdir={upper},workdir={work}",
        )
    except OSError as e:
        raise FailedPrecondition(f"cannot mount the container rootfs: {e.strerror}") from None


def bind_host_path(source: Path, target: Path, readonly: bool) -> None:
    """Bind-mounts a host file or directory at ``target`` (created to match), nodev and nosuid,
    read-only when asked.

    Raises:
        InvalidArgument: the host path does not exist.
        FailedPrecondition: the kernel refused the bind mount.
    """
    if not source.exists():
        raise InvalidArgument(f"host path {source} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        target.mkdir(exist_ok=True)
    else:
        target.touch(exist_ok=True)
    flags = MS_BIND | MS_REMOUNT | GUEST_WRITABLE_FLAGS | (MS_RDONLY if readonly else 0)
    try:
        mount(str(source), str(target), "", MS_BIND | MS_REC)
        mount(str(source), str(target), "", flags)
    except OSError as e:
        raise FailedPrecondition(f"cannot share host path {source} with the guest: {e.strerror}") from None


def unmount_all(path: Path, attempts: int = 20) -> None:
    """Unmounts everything at or below ``path``; after a few busy retries it detaches lazily,
    so a QEMU 9p server still holding a file cannot make teardown fail."""
    for target in mount_points_below(os.path.realpath(path)):
        for attempt in range(attempts):
            try:
                umount(target)
                break
            except OSError as e:
                if e.errno == 22:  # EINVAL: no longer a mount point
                    break
                if attempt == attempts - 1:
                    with contextlib.suppress(OSError):
                        umount(target, MNT_DETACH)
                else:
                    time.sleep(0.05)


def remove_tree(path: Path) -> None:
    """Unmounts whatever is mounted below ``path``, then deletes it (idempotent)."""
    if not path.exists():
        return
    unmount_all(path)
    shutil.rmtree(path, ignore_errors=True)

"""Container root filesystems on the host: an overlay of read-only image layers and a writable
per-container layer, mounted below the sandbox's shared dir so the guest sees it over 9p, and the
host paths a container asks for, bind-mounted next to it.

The guest writes to ``<sandbox>/shared`` as root and can replace any name in it with a link at any
time, so every operation below it goes through ``host.beneath`` (no link followed, never out of
the directory) and ``host.mounts`` (mounts made onto an fd, recorded by id, detached by id). The
writable layer (``<sandbox>/layers/<id>``) is filled by the guest through the overlay: it is
removed the same way. Layout of a sandbox dir, relative to it::

    shared/                   the 9p export (a nodev, nosuid bind of itself)
    shared/containers/<id>/rootfs   the container's overlay
    shared/mounts/<id>/<n>          the container's n-th host path
    layers/<id>/{upper,work}        the container's writable layer
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.errors import FailedPrecondition, InvalidArgument
from kvmsandbox.host import beneath, mounts

log = logging.getLogger(__name__)

SHARED = "shared"


@dataclass(frozen=True)
class HostPath:
    """A host file or directory a container asked for."""

    source: Path
    readonly: bool


def container_dirs(container_id: str) -> list[str]:
    """What a container has in its sandbox dir, in teardown order (the overlay before its layer)."""
    return [f"{SHARED}/containers/{container_id}", f"{SHARED}/mounts/{container_id}", f"layers/{container_id}"]


def seal_shared_dir(sandbox_dir: Path) -> None:
    """Creates the shared dir and makes it a nodev, nosuid bind mount of itself, before any guest
    can write to it.

    Raises:
        FailedPrecondition: the kernel refused (its reason in the message).
    """
    try:
        with beneath.opened_dir(sandbox_dir) as sfd:
            target = beneath.make_dirs(sfd, SHARED)
            try:
                tree = mounts.clone_tree(Path(beneath.fd_path(target)), mounts.GUEST_WRITABLE)
                try:
                    seal = mounts.attach(tree, target)
                finally:
                    os.close(tree)
            finally:
                os.close(target)
            try:
                with _shared(sfd) as shared:
                    os.close(beneath.make_dirs(shared, "containers"))
            except OSError:
                _detach(sandbox_dir, seal)
                raise
    except OSError as e:
        raise FailedPrecondition(f"cannot prepare the shared dir of {sandbox_dir}: {e.strerror}") from None


def mount_rootfs(sandbox_dir: Path, container_id: str, lower_dirs: Sequence[Path]) -> int:
    """Mounts ``lower_dirs`` (top first, read-only) under a new writable layer at the container's
    rootfs; returns the mount's id.

    Raises:
        InvalidArgument: no lower dir, or one is missing.
        FailedPrecondition: the guest put something else than a directory on the way, or the
            kernel refused the mount (the reason in the message).
    """
    if not lower_dirs:
        raise InvalidArgument("a container rootfs needs at least one image layer")
    for d in lower_dirs:
        if not d.is_dir():
            raise InvalidArgument(f"image layer {d} does not exist")
    try:
        with beneath.opened_dir(sandbox_dir) as sfd:
            for part in ("upper", "work"):
                os.close(beneath.make_dirs(sfd, f"layers/{container_id}/{part}"))
            layer = sandbox_dir / "layers" / container_id
            tree = mounts.overlay(list(lower_dirs), layer / "upper", layer / "work")
            try:
                return _attach_below(sfd, tree, f"containers/{container_id}/rootfs", is_dir=True)
            finally:
                os.close(tree)
    except OSError as e:
        raise FailedPrecondition(f"cannot mount the rootfs of container {container_id}: {e.strerror}") from None


def bind_host_path(sandbox_dir: Path, container_id: str, index: int, host: HostPath) -> int:
    """Bind-mounts a host path (recursively; nodev, nosuid, read-only all the way down when asked)
    as the container's ``index``-th host mount; returns the mount's id.

    Raises:
        InvalidArgument: the host path does not exist.
        FailedPrecondition: the guest put a link on the way, or the kernel refused.
    """
    if not host.source.exists():
        raise InvalidArgument(f"host path {host.source} does not exist")
    attrs = mounts.GUEST_WRITABLE | (mounts.MOUNT_ATTR_RDONLY if host.readonly else 0)
    try:
        with beneath.opened_dir(sandbox_dir) as sfd:
            tree = mounts.clone_tree(host.source, attrs)
            try:
                return _attach_below(sfd, tree, f"mounts/{container_id}/{index}", is_dir=host.source.is_dir())
            finally:
                os.close(tree)
    except OSError as e:
        raise FailedPrecondition(f"cannot share host path {host.source} with the guest: {e.strerror}") from None


@contextlib.contextmanager
def _shared(sfd: int) -> Iterator[int]:
    """The shared dir, entered from the sandbox dir (the guest cannot replace its export's root)."""
    fd = beneath.openat2(sfd, SHARED, os.O_PATH | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _attach_below(sfd: int, tree: int, rel: str, *, is_dir: bool) -> int:
    """Attaches ``tree`` at ``rel`` below the shared dir; no step may be a link or another mount."""
    with _shared(sfd) as shared:
        target = beneath.make_dirs(shared, rel) if is_dir else beneath.make_file(shared, rel)
        try:
            return mounts.attach(tree, target)
        finally:
            os.close(target)


def release_container(sandbox_dir: Path, container_id: str, mount_ids: Sequence[int]) -> None:
    """Detaches the container's mounts and deletes its dirs (idempotent).

    The mounts are the recorded ids, wherever the guest has moved them since, and any mount left
    at the container's own dirs (made by a create that did not finish recording); each is reached
    without following links and checked by id. Nothing is raised: what cannot be removed is
    logged and left for the sandbox's removal.
    """
    for mid in mount_ids:
        _detach(sandbox_dir, mid)
    real = Path(os.path.realpath(sandbox_dir))
    for rel in container_dirs(container_id):
        for m in mounts.mounts_below(real / rel):
            _detach(sandbox_dir, m.id)
    _remove(sandbox_dir, container_dirs(container_id))


def remove_sandbox_dir(sandbox_dir: Path) -> None:
    """Detaches every mount below the sandbox dir (the shared dir's seal last) and deletes it
    (idempotent). Nothing is raised: what cannot be removed is logged."""
    if not sandbox_dir.is_dir():
        return
    for m in mounts.mounts_below(Path(os.path.realpath(sandbox_dir))):
        _detach(sandbox_dir, m.id)
    _remove(sandbox_dir.parent, [sandbox_dir.name])


def _detach(root: Path, mount_id: int) -> None:
    try:
        mounts.detach(root, mount_id)
    except OSError as e:
        log.warning("cannot detach mount %d below %s: %s", mount_id, root, e.strerror)


def _remove(root: Path, rels: list[str]) -> None:
    try:
        with beneath.opened_dir(root) as fd:
            for rel in rels:
                try:
                    beneath.remove(fd, rel)
                except OSError as e:
                    log.warning("cannot remove %s below %s: %s", rel, root, e.strerror)
    except FileNotFoundError:
        return

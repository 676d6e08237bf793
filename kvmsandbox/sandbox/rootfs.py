"""Container root filesystems on the host: an overlay of read-only image layers and a writable
per-container layer, mounted below the sandbox's shared dir so the guest sees it over virtio-fs, and
the host paths a container asks for, bind-mounted next to it.

The shared dir and its pinned dirs are shared mounts: virtiofsd (pivoted into the shared dir in its
own mount namespace, a slave of ours) sees every mount made or removed below them afterwards.

The guest writes to ``<sandbox>/shared`` as root and can replace any name in it with a link at any
time, so every operation below it goes through ``host.beneath`` (no link followed, never out of
the directory) and ``host.mounts`` (private mounts made onto an fd, recorded by id, detached by
id). Every mount point is itself, or sits directly in, a mount point: the kernel refuses to rename
or remove a mount point, so the guest cannot move a mount away from where it was made. The
writable layer (``<sandbox>/layers/<id>``) is filled by the guest through the overlay: it is
removed the same way. Layout of a sandbox dir, relative to it::

    shared/                     the virtio-fs export (a nodev, nosuid bind of itself)
    shared/containers/          a bind of itself
    shared/containers/<id>      the container's overlay (its rootfs)
    shared/mounts/              a bind of itself
    shared/mounts/<id>@<n>      the container's n-th host path (mounted in the virtio-fs daemon's
                                mount namespace only, where it runs; see ``host.nsattach``)
    layers/<id>/{upper,work}    the container's writable layer
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.errors import FailedPrecondition, InvalidArgument
from kvmsandbox.host import beneath, mounts, nsattach

log = logging.getLogger(__name__)

SHARED = "shared"
PINNED = ("containers", "mounts")  # below SHARED: binds of themselves, so never renamed
# Seconds a container's removal spends deleting what its guest wrote while the guest runs.
LIVE_REMOVE_SECONDS = 60.0


@dataclass(frozen=True)
class HostPath:
    """A host file or directory a container asked for."""

    source: Path
    readonly: bool
    recursive_readonly: bool = True
    host_to_container: bool = False


def rootfs_dir(container_id: str) -> str:
    """The container's rootfs, relative to the shared dir (where the guest finds it)."""
    return f"containers/{container_id}"


def host_path_dir(container_id: str, index: int) -> str:
    """The container's ``index``-th host path, relative to the shared dir ('@' is in no id)."""
    return f"mounts/{container_id}@{index}"


def container_dirs(container_id: str) -> list[str]:
    """What a container has in its sandbox dir, in teardown order (the overlay before its layer);
    ``shared/mounts/<id>`` is where an earlier release put its host paths."""
    return [f"{SHARED}/{rootfs_dir(container_id)}", f"{SHARED}/mounts/{container_id}", f"layers/{container_id}"]


def seal_shared_dir(sandbox_dir: Path) -> None:
    """Creates the shared dir and makes it a nodev, nosuid bind mount of itself, with ``containers``
    and ``mounts`` binds of themselves in it, before any guest can write to it. Each is a peer
    group of its own (shared with no other mount of the host): virtiofsd's copies follow them.

    Raises:
        FailedPrecondition: the kernel refused (its reason in the message).
    """
    made: list[int] = []
    try:
        with beneath.opened_dir(sandbox_dir) as sfd:
            made.append(_self_bind(sfd, SHARED))
            with _shared(sfd) as shared:
                for name in PINNED:
                    made.append(_self_bind(shared, name))
    except OSError as e:
        for mid in reversed(made):
            _detach(sandbox_dir, mid)
        raise FailedPrecondition(f"cannot prepare the shared dir of {sandbox_dir}: {e.strerror}") from None


def _self_bind(dir_fd: int, name: str) -> int:
    target = beneath.make_dirs(dir_fd, name)
    try:
        tree = mounts.clone_tree(Path(beneath.fd_path(target)), mounts.GUEST_WRITABLE)
        try:
            mid = mounts.attach(tree, target)
            mounts.share(tree)
            return mid
        finally:
            os.close(tree)
    finally:
        os.close(target)


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
                return _attach_below(sfd, tree, rootfs_dir(container_id), is_dir=True)
            finally:
                os.close(tree)
    except OSError as e:
        raise FailedPrecondition(f"cannot mount the rootfs of container {container_id}: {e.strerror}") from None


def bind_host_path(
    sandbox_dir: Path, container_id: str, index: int, host: HostPath, namespace_pid: int | None = None
) -> int:
    """Bind-mounts a host path (recursively; nodev, nosuid; read-only on its own mount, or all the
    way down, when asked; a slave of the host's mount when mounts made there later must appear)
    as the container's ``index``-th host mount; returns the mount's id. With ``namespace_pid``
    (the pod's virtio-fs daemon, pivoted into the shared dir) the mount is made in that process's
    mount namespace only (``host.nsattach``) and 0 is returned: the node keeps no copy of it, and
    removing its dir from here detaches it there.

    Raises:
        InvalidArgument: the host path does not exist.
        FailedPrecondition: the guest put a link on the way, or the kernel refused.
    """
    if not host.source.exists():
        raise InvalidArgument(f"host path {host.source} does not exist")
    # Below the sandboxes dir, every pod's guest writes: no pod gets another's (or its own) files.
    real, sandboxes = os.path.realpath(host.source), os.path.realpath(sandbox_dir.parent)
    if (real + "/").startswith(sandboxes.rstrip("/") + "/"):
        raise InvalidArgument(f"host path {host.source} is in the runtime's sandbox dirs: pods cannot share it")
    rdonly = mounts.MOUNT_ATTR_RDONLY if host.readonly else 0
    recursive = rdonly if host.recursive_readonly else 0
    try:
        with beneath.opened_dir(sandbox_dir) as sfd:
            tree = mounts.clone_tree(
                Path(real), mounts.GUEST_WRITABLE | recursive, top_attrs=rdonly, private=not host.host_to_container
            )
            try:
                rel, is_dir, slave = host_path_dir(container_id, index), os.path.isdir(real), host.host_to_container
                if namespace_pid is not None:
                    nsattach.attach_in(namespace_pid, tree, "/", rel, is_dir=is_dir, slave=slave)
                    return 0
                return _attach_below(sfd, tree, rel, is_dir=is_dir, slave=slave)
            finally:
                os.close(tree)
    except OSError as e:
        raise FailedPrecondition(f"cannot share host path {host.source} with the guest: {e.strerror}") from None


@contextlib.contextmanager
def _shared(sfd: int, name: str = "") -> Iterator[int]:
    """The shared dir (or its pinned subdir ``name``), entered from the sandbox dir; refused when it
    is not the mount it should be (a seal gone would let guest files land on a plain host dir).

    Raises:
        OSError: EXDEV when the seal (or the pinned bind) is not there.
    """
    shared = beneath.openat2(sfd, SHARED, os.O_PATH | os.O_DIRECTORY)
    try:
        if mounts.mount_id(shared) == mounts.mount_id(sfd):
            raise OSError(errno.EXDEV, f"{SHARED} is not sealed")
        if not name:
            yield shared
            return
        fd = beneath.openat2(shared, name, os.O_PATH | os.O_DIRECTORY)
        try:
            if mounts.mount_id(fd) == mounts.mount_id(shared):
                raise OSError(errno.EXDEV, f"{SHARED}/{name} is not pinned")
            yield fd
        finally:
            os.close(fd)
    finally:
        os.close(shared)


def _ensure_pinned(sfd: int, name: str) -> None:
    """Pods made by an earlier release have no pinned binds in their share: made on first use."""
    try:
        with _shared(sfd, name):
            return
    except OSError as e:
        if e.errno != errno.EXDEV or "pinned" not in str(e):
            raise
    with _shared(sfd) as shared:
        _self_bind(shared, name)


def _attach_below(sfd: int, tree: int, rel: str, *, is_dir: bool, slave: bool = False) -> int:
    """Attaches ``tree`` at ``rel`` ("containers/<x>" or "mounts/<x>") right in its pinned dir."""
    pinned, name = rel.split("/")
    _ensure_pinned(sfd, pinned)
    with _shared(sfd, pinned) as parent:
        target = beneath.make_dirs(parent, name) if is_dir else beneath.make_file(parent, name)
        try:
            return mounts.attach(tree, target, slave=slave)
        finally:
            os.close(target)


def release_container(
    sandbox_dir: Path, container_id: str, mount_ids: Sequence[int], seconds: float = LIVE_REMOVE_SECONDS
) -> None:
    """Detaches the container's mounts and deletes its dirs (idempotent).

    The mounts are the recorded ids, wherever the guest has moved them since, and any mount left
    at the container's own dirs (made by a create that did not finish recording); each is reached
    without following links and checked by id. Nothing is raised: what cannot be removed is
    logged and left for the sandbox's removal.
    """
    for mid in mount_ids:
        _detach(sandbox_dir, mid)
    real = Path(os.path.realpath(sandbox_dir))
    host_paths = f"{real}/{SHARED}/mounts/{container_id}@"
    for m in mounts.mounts_below(real / SHARED):
        own = any((m.mount_point + "/").startswith(f"{real}/{rel}/") for rel in container_dirs(container_id))
        if own or m.mount_point.startswith(host_paths):
            _detach(sandbox_dir, m.id)
    # The guest still runs and may keep writing (through a file it holds open): the work is
    # bounded, and what is left goes with the sandbox.
    dirs = [*container_dirs(container_id), *_host_path_dirs(sandbox_dir, container_id)]
    _remove(sandbox_dir, dirs, seconds)


def _host_path_dirs(sandbox_dir: Path, container_id: str) -> list[str]:
    """The names of the container's host paths in the shared dir (listed, never followed)."""
    try:
        with beneath.opened_dir(sandbox_dir) as sfd, _shared(sfd, "mounts") as parent:
            listing = os.open(beneath.fd_path(parent), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                names = [e.name for e in os.scandir(listing) if e.name.startswith(f"{container_id}@")]
            finally:
                os.close(listing)
    except OSError:
        return []
    return [f"{SHARED}/mounts/{name}" for name in names[:1024]]


def remove_sandbox_dir(sandbox_dir: Path) -> None:
    """Detaches every mount below the sandbox dir (the shared dir's seal last), moves it to the
    state dir's trash at once (so no half-deleted sandbox dir is ever read again as a sandbox) and
    deletes it there; what cannot be deleted now stays in the trash for ``empty_trash`` at the
    next start. Idempotent; nothing is raised, what is left is logged."""
    if not sandbox_dir.is_dir():
        return
    for m in mounts.mounts_below(Path(os.path.realpath(sandbox_dir))):
        _detach(sandbox_dir, m.id)
    trash = _trash_of(sandbox_dir)
    beneath.private_dir(trash)
    name = f"{sandbox_dir.name}.{secrets.token_hex(4)}"
    try:
        os.rename(sandbox_dir, trash / name)
    except OSError as e:
        log.warning("cannot move %s to the trash: %s", sandbox_dir, e.strerror)
        _remove(sandbox_dir.parent, [sandbox_dir.name])
        return
    _remove(trash, [name])


def empty_trash(sandboxes: Path) -> None:
    """Deletes what removals left in the trash (a mount that could not be detached then, a tree
    that kept refilling, a crash in the middle)."""
    trash = _trash_of(sandboxes / "x")
    if not trash.is_dir():
        return
    for name in sorted(os.listdir(trash))[:10_000]:
        for m in mounts.mounts_below(Path(os.path.realpath(trash / name))):
            _detach(trash, m.id)
        _remove(trash, [name])


def _trash_of(sandbox_dir: Path) -> Path:
    return sandbox_dir.parent.parent / "trash"


def _detach(root: Path, mount_id: int) -> None:
    try:
        mounts.detach(root, mount_id)
    except OSError as e:
        log.warning("cannot detach mount %d below %s: %s", mount_id, root, e.strerror)


def _remove(root: Path, rels: list[str], seconds: float | None = None) -> None:
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        with beneath.opened_dir(root) as fd:
            for rel in rels:
                try:
                    beneath.remove(fd, rel, deadline)
                except OSError as e:
                    log.warning("cannot remove %s below %s: %s", rel, root, e.strerror)
    except FileNotFoundError:
        return

"""Path operations below a directory a guest can write, that never follow a link out of it.

A guest writes to its share (over 9p) as root: it can replace any name the host will later use
with a symlink, or rename a directory away and put a link in its place. So below such a directory
the host opens every component with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS)``, creates with ``mkdirat``/``openat`` relative to those fds, and deletes
with fd-relative calls that never follow a link nor cross into another mount, holding a bounded
number of fds however deep the tree a guest made. Linux 5.6 or later (``openat2``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

_SYS_OPENAT2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
# Every lookup below a guest-writable directory.
SAFE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

# A removal gives up after this many entries (a tree that keeps refilling: a guest still writing
# into it through a file it holds open); callers with a guest alive also give it a deadline.
REMOVE_BUDGET = 20_000_000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = SAFE) -> int:
    """openat2(2); the new fd is close-on-exec.

    Raises:
        OSError: ELOOP for a symlink on the way, EXDEV for a step out of ``dirfd``, and the rest.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open {path!r}: {os.strerror(err)}", path)
    return int(fd)


def fd_path(fd: int) -> str:
    """A path that names exactly the object ``fd`` refers to (a magic link)."""
    return f"/proc/self/fd/{fd}"


@contextlib.contextmanager
def opened_dir(path: str | os.PathLike[str]) -> Iterator[int]:
    """An O_PATH fd of a directory the host owns (the root below which the guest may write)."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def private_dir(path: Path) -> None:
    """Creates ``path`` (and its parents) unless it exists and makes it reachable by its owner only:
    what a guest or an image wrote below it (setuid files, device nodes) is out of other host
    users' reach."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def traversable_dir(path: Path) -> None:
    """Creates ``path`` (and its parents) unless it exists and makes it 0711: other users may pass
    through to a name they know (the VMMs' uids reach libvirt's per-VM files this way) but not
    list it; everything in it is private_dir or a private file."""
    path.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(path, 0o711)


def make_dirs(root_fd: int, rel: str, mode: int = 0o755) -> int:
    """Creates the directories of ``rel`` below ``root_fd`` (as ``mkdir -p``, each step without
    following links nor leaving the mount) and returns an O_PATH fd of the last one.

    Raises:
        OSError: a component is a symlink, a mount point or not a directory, or mkdir failed.
    """
    fd = os.dup(root_fd)
    try:
        for part in _parts(rel):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, mode, dir_fd=fd)
            child = openat2(fd, part, os.O_PATH | os.O_DIRECTORY, resolve=SAFE | RESOLVE_NO_XDEV)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_file(root_fd: int, rel: str, mode: int = 0o644) -> int:
    """Creates an empty file at ``rel`` below ``root_fd`` (its parents as ``make_dirs``) unless it
    exists, and returns an O_PATH fd of it.

    Raises:
        OSError: a component is a symlink, or the name is taken by something else than a file.
    """
    parent, name = _split(rel)
    dfd = make_dirs(root_fd, parent) if parent else os.dup(root_fd)
    try:
        # O_EXCL: what is there already is never opened for writing (a FIFO would block).
        with contextlib.suppress(FileExistsError):
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
            os.close(openat2(dfd, name, flags, mode, SAFE | RESOLVE_NO_XDEV))
        fd = openat2(dfd, name, os.O_PATH | os.O_NOFOLLOW, resolve=SAFE | RESOLVE_NO_XDEV)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EEXIST, f"{rel!r} exists and is not a regular file", rel)
        return fd
    finally:
        os.close(dfd)


def read_in_root(root: Path, rel: str, limit: int) -> bytes | None:
    """The contents of the regular file ``rel`` of a tree that is not the host's (an image layer),
    every link resolved as if ``root`` were ``/`` (``RESOLVE_IN_ROOT``): nothing outside it is ever
    opened. None when it is not a regular file (a FIFO is never read, a device never opened for
    real: O_PATH first).

    Raises:
        FileNotFoundError: it is not there (nor is what a link of it names, inside ``root``).
        OSError: EFBIG when it holds more than ``limit`` bytes; ELOOP and the like.
    """
    resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
    with opened_dir(root) as root_fd:
        probe = openat2(root_fd, rel, os.O_PATH, resolve=resolve)
        try:
            if not stat.S_ISREG(os.fstat(probe).st_mode):
                return None
            # Reopened through its magic link: exactly the file the probe found.
            fd = os.open(fd_path(probe), os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        finally:
            os.close(probe)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"{rel} is larger than {limit} bytes")
    return data


class Usage:
    """What a tree holds: allocated bytes and inodes; ``complete`` False when the count stopped at
    its budget or its depth limit (then the figures are a lower bound)."""

    __slots__ = ("complete", "entries", "used_bytes")

    def __init__(self) -> None:
        self.used_bytes = 0
        self.entries = 0
        self.complete = True


def tree_usage(root: Path, rel: str, max_entries: int = 200_000, max_depth: int = 64) -> Usage:
    """Counts the allocated blocks and the entries of ``rel`` below ``root`` (a tree a guest
    fills): through fds only, never following a link nor entering another mount, with at most
    ``max_depth`` directories open and ``max_entries`` entries looked at."""
    usage = Usage()
    try:
        with opened_dir(root) as root_fd:
            top = openat2(root_fd, rel, os.O_RDONLY | os.O_DIRECTORY, resolve=SAFE)
    except OSError:
        return usage
    try:
        _count(top, usage, max_entries, max_depth)
    finally:
        os.close(top)
    return usage


def _count(dfd: int, usage: Usage, max_entries: int, depth: int) -> None:
    with os.scandir(dfd) as it:
        for entry in it:
            if usage.entries >= max_entries:
                usage.complete = False
                return
            usage.entries += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            usage.used_bytes += st.st_blocks * 512
            if not stat.S_ISDIR(st.st_mode):
                continue
            if depth <= 0:
                usage.complete = False
                continue
            try:
                child = openat2(dfd, entry.name, os.O_RDONLY | os.O_DIRECTORY, resolve=SAFE | RESOLVE_NO_XDEV)
            except OSError:
                continue
            try:
                _count(child, usage, max_entries, depth - 1)
            finally:
                os.close(child)


def remove(root_fd: int, rel: str, deadline: float | None = None) -> None:
    """Deletes ``rel`` below ``root_fd`` and everything in it, through fds only: never following a
    link, never entering another mount, with a few fds open, no recursion and no listing held in
    memory however deep or wide the tree (idempotent).

    Subdirectories are renamed up into ``rel`` itself before they are emptied, so the work stays
    flat. A mount point met on the way is left in place with what is below it. ``deadline`` (a
    ``time.monotonic()`` value) bounds the work while a guest may still be writing to the tree.

    Raises:
        OSError: EBUSY when a mount point was left; ETIMEDOUT when the tree kept refilling past
            the deadline or REMOVE_BUDGET entries.
    """
    parent, name = _split(rel)
    try:
        pfd = openat2(root_fd, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            _unlink(pfd, name)
            return
        top = openat2(pfd, name, os.O_RDONLY | os.O_DIRECTORY, resolve=SAFE | RESOLVE_NO_XDEV)
        try:
            _empty_flat(top, deadline)
        finally:
            os.close(top)
        os.rmdir(name, dir_fd=pfd)
    finally:
        os.close(pfd)


def _empty_flat(top: int, deadline: float | None) -> None:
    dev, busy, names, budget = os.fstat(top).st_dev, set[str](), itertools.count(), REMOVE_BUDGET
    while True:
        seen = False
        with os.scandir(top) as it:
            for entry in it:
                if entry.name in busy:
                    continue
                seen = True
                budget -= 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_dev != dev or not _remove_or_hoist(top, entry.name, st, names):
                    busy.add(entry.name)
                if budget <= 0 or (deadline is not None and time.monotonic() > deadline):
                    raise OSError(errno.ETIMEDOUT, "the tree kept refilling while it was removed")
        if not seen:
            if busy:
                raise OSError(errno.EBUSY, f"mount points left in place: {sorted(busy)[:5]}")
            return


def _remove_or_hoist(top: int, name: str, st: os.stat_result, names: Iterator[int]) -> bool:
    """Removes the file ``top/name``, or empties the directory of files, renames its subdirectories
    into ``top`` (emptied on a later pass) and removes it. False when it is, or holds, a mount
    point (the kernel refuses to unlink, rename or remove one; openat2 refuses to enter one), or
    when the guest changed it under our feet (it is looked at again on the next pass)."""
    try:
        if not stat.S_ISDIR(st.st_mode):
            _unlink(top, name)
            return True
        fd = openat2(top, name, os.O_RDONLY | os.O_DIRECTORY, resolve=SAFE | RESOLVE_NO_XDEV)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EBUSY, errno.ELOOP, errno.ENOTDIR):
            return e.errno not in (errno.EXDEV, errno.EBUSY)
        raise
    kept = False
    try:
        with os.scandir(fd) as it:
            for entry in it:
                try:
                    inner = entry.stat(follow_symlinks=False)
                    if inner.st_dev != st.st_dev:
                        kept = True
                    elif stat.S_ISDIR(inner.st_mode):
                        _hoist(fd, entry.name, top, names)
                    else:
                        _unlink(fd, entry.name)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno not in _CHANGED:
                        raise
                    kept = True
    finally:
        os.close(fd)
    if kept:
        return False
    try:
        os.rmdir(name, dir_fd=top)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno not in _CHANGED:
            raise
        return False
    return True


# What a guest changing the tree during a removal (or a mount point) makes a step fail with.
_CHANGED = (errno.EBUSY, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR, errno.EEXIST)
_SYS_RENAMEAT2 = 316
_RENAME_NOREPLACE = 1


def _hoist(dfd: int, name: str, top: int, names: Iterator[int]) -> None:
    """Moves ``dfd/name`` into ``top`` under a fresh name, never over something there."""
    for _ in range(1000):
        new = os.fsencode(f".rm-{next(names)}")
        if _libc.syscall(_SYS_RENAMEAT2, dfd, os.fsencode(name), top, new, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.ENOENT:
            return
        if err != errno.EEXIST:
            raise OSError(err, f"rename {name!r}: {os.strerror(err)}")
    raise OSError(errno.EEXIST, "no free name to move a directory to while removing a tree")


def _unlink(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def _parts(rel: str) -> list[str]:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or rel.startswith("/"):
        raise OSError(errno.EINVAL, f"{rel!r} is not a plain relative path")
    return parts


def _split(rel: str) -> tuple[str, str]:
    parts = _parts(rel)
    if not parts:
        raise OSError(errno.EINVAL, "an empty path names nothing to create or remove")
    return "/".join(parts[:-1]), parts[-1]

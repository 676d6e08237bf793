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
from collections.abc import Iterator
from pathlib import Path

_SYS_OPENAT2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# Every lookup below a guest-writable directory.
SAFE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

# A removal gives up after this many entries (a tree that keeps refilling: a guest still writing
# into it through a file it holds open).
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


def remove(root_fd: int, rel: str) -> None:
    """Deletes ``rel`` below ``root_fd`` and everything in it, through fds only: never following a
    link, never entering another mount, with at most three fds open and no recursion however deep
    the tree (idempotent).

    Subdirectories are renamed up into ``rel`` itself before they are emptied, so the work stays
    flat. A mount point met on the way is left in place with what is below it.

    Raises:
        OSError: EBUSY when a mount point was left; ENOTEMPTY when the tree kept refilling.
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
            _empty_flat(top)
        finally:
            os.close(top)
        os.rmdir(name, dir_fd=pfd)
    finally:
        os.close(pfd)


def _empty_flat(top: int) -> None:
    dev, busy, names, budget = os.fstat(top).st_dev, set[str](), itertools.count(), REMOVE_BUDGET
    while budget > 0:
        entries = [e for e in os.scandir(top) if e.name not in busy]
        if not entries:
            if busy:
                raise OSError(errno.EBUSY, f"mount points left in place: {sorted(busy)[:5]}")
            return
        budget -= len(entries)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if st.st_dev != dev or not _remove_or_hoist(top, entry.name, st, names):
                busy.add(entry.name)
    raise OSError(errno.ENOTEMPTY, "the tree kept refilling while it was removed")


def _remove_or_hoist(top: int, name: str, st: os.stat_result, names: Iterator[int]) -> bool:
    """Removes the file ``top/name``, or empties the directory of files, renames its subdirectories
    into ``top`` (emptied on a later pass) and removes it. False when it is, or holds, a mount
    point (the kernel refuses to unlink, rename or remove one; openat2 refuses to enter one)."""
    try:
        if not stat.S_ISDIR(st.st_mode):
            _unlink(top, name)
            return True
        fd = openat2(top, name, os.O_RDONLY | os.O_DIRECTORY, resolve=SAFE | RESOLVE_NO_XDEV)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.EXDEV, errno.EBUSY):
            return False
        raise
    kept = False
    try:
        for entry in os.scandir(fd):
            inner = entry.stat(follow_symlinks=False)
            try:
                if inner.st_dev != st.st_dev:
                    kept = True
                elif stat.S_ISDIR(inner.st_mode):
                    _hoist(fd, entry.name, top, names)
                else:
                    _unlink(fd, entry.name)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                kept = True
    finally:
        os.close(fd)
    if kept:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=top)
    return True


def _hoist(dfd: int, name: str, top: int, names: Iterator[int]) -> None:
    for _ in range(1000):
        new = f".rm-{next(names)}"
        try:
            os.stat(new, dir_fd=top, follow_symlinks=False)
            continue
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileNotFoundError):
            os.rename(name, new, src_dir_fd=dfd, dst_dir_fd=top)
        return
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

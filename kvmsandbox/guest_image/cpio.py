"""A minimal writer of ``newc`` cpio archives, the format the kernel unpacks as initramfs.

Written here rather than driving cpio(1) so that device nodes (``/dev/console``) need no root and
no mknod, and so the archive is reproducible: every entry has mtime 0 and owner root.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFREG | 0o755``)."""

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def directory(path: str, perm: int = 0o755) -> Entry:
    """A directory entry. Raises nothing."""
    return Entry(path, stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    """A regular file entry. Raises nothing."""
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    """A symbolic link entry (the target is the link's data). Raises nothing."""
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    """A character device node. Raises nothing."""
    return Entry(path, stat.S_IFCHR | perm, b"", major, minor)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: Entry, name: bytes) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime
        len(entry.data),
        0,  # dev major
        0,  # dev minor
        entry.rdev_major,
        entry.rdev_minor,
        len(name),
        0,  # check (unused by newc)
    )
    return b"070701" + b"".join(b"%08x" % f for f in fields)


def write_newc(out: BinaryIO, entries: list[Entry]) -> None:
    """Writes ``entries`` (parents before children) and the trailer as a newc archive.

    Raises:
        ValueError: an entry path is absolute or empty (the kernel wants ``bin/busybox``).
        OSError: writing failed.
    """
    for ino, entry in enumerate([*entries, Entry(TRAILER, 0)], start=1):
        if not entry.path or entry.path.startswith("/"):
            raise ValueError(f"cpio entry path must be relative and non-empty: {entry.path!r}")
        name = entry.path.encode() + b"\0"
        header = _header(ino if entry.path != TRAILER else 0, entry, name)
        out.write(header + name + _pad(len(header) + len(name)))
        out.write(entry.data + _pad(len(entry.data)))

"""A VM's serial console log, bounded: QEMU appends whatever the guest writes to its serial port
(``O_APPEND``), and a guest that got root writes without end. Readers take a bounded tail; a trim
drops the head of a file past its cap and keeps the most recent output.

The trim collapses the head out of the file (``fallocate(FALLOC_FL_COLLAPSE_RANGE)``, whole
filesystem blocks): the kernel does it under the inode lock, so an append of QEMU's lands wholly
after it, and no byte is copied. Where the filesystem cannot (tmpfs, XFS without the feature, a
cap below two blocks), the tail is copied to the start and the file cut behind it; output QEMU
appends between the copy's last read and the cut is lost.

The file is opened without following a link, only when it is a regular file with one name, and
never opened for real before that is checked (``O_PATH`` first): a link, a FIFO, a device or a
second name of another file in its place is left alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

FALLOC_FL_COLLAPSE_RANGE = 0x08
# The copy fallback moves this much per read.
COPY_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def open_log(path: Path, flags: int) -> int:
    """An fd of the regular file ``path`` opened with ``flags`` (close-on-exec, non-blocking).

    Raises:
        OSError: ELOOP for a symlink, EINVAL for anything but a regular file with one link,
            FileNotFoundError when it is not there.
    """
    probe = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(probe)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "it is a symlink", str(path))
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OSError(errno.EINVAL, "it is not a regular file with one link", str(path))
        # Reopened through the O_PATH fd: the very inode just checked, whatever the name holds now.
        return os.open(f"/proc/self/fd/{probe}", flags | os.O_CLOEXEC | os.O_NONBLOCK)
    finally:
        os.close(probe)


def read_tail(path: Path, max_bytes: int) -> bytes:
    """At most the last ``max_bytes`` bytes of the log (read from the end, never the whole file).

    Raises:
        OSError: as ``open_log``.
    """
    fd = open_log(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - max_bytes)
        return os.pread(fd, size - start, start)
    finally:
        os.close(fd)


def trim(path: Path, max_bytes: int, keep_bytes: int) -> int:
    """Drops the head of the log when it holds more than ``max_bytes``, keeping at most its last
    ``keep_bytes`` (at most ``max_bytes``); returns how many bytes went (0 when under the cap).

    Raises:
        OSError: as ``open_log``, or the filesystem refused both ways to drop the head.
    """
    keep_bytes = min(keep_bytes, max_bytes)
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if stat.S_ISREG(st.st_mode) and st.st_size <= max_bytes:
        return 0  # the common case: one lstat, nothing opened
    fd = open_log(path, os.O_RDWR)
    try:
        st = os.fstat(fd)
        if st.st_size <= max_bytes:
            return 0
        block = max(st.st_blksize, 512)
        # Rounded up to whole blocks: what stays is at most keep_bytes, and never the whole file
        # (a collapse may not reach its end).
        drop = -(-(st.st_size - keep_bytes) // block) * block
        if drop < st.st_size and _collapse(fd, drop):
            return drop
        return _copy_tail(fd, st.st_size - keep_bytes, st.st_size + max_bytes)
    finally:
        os.close(fd)


def _collapse(fd: int, length: int) -> bool:
    """Removes the file's first ``length`` bytes in place; False where the filesystem cannot."""
    if _libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, f"collapsing the head of the console log: {os.strerror(err)}")


def _copy_tail(fd: int, start: int, limit: int) -> int:
    """Moves the bytes from ``start`` to the end (what QEMU appends meanwhile included, up to
    offset ``limit``) to the start of the file and cuts it behind them; returns ``start``."""
    src, dst = start, 0
    while src < limit:
        chunk = os.pread(fd, min(COPY_CHUNK, limit - src), src)
        if not chunk:
            break
        os.pwrite(fd, chunk, dst)
        src += len(chunk)
        dst += len(chunk)
    os.ftruncate(fd, dst)
    return start

"""Thin wrappers of Linux system calls the runtime needs on both sides of the VM boundary
(this module is copied into the guest with the agent)."""

from __future__ import annotations

import ctypes
import os

MNT_DETACH = 2
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2).

    Raises:
        OSError: the kernel refused; the message names the mount and the reason.
    """
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} {source} {target} ({data}): {os.strerror(err)}")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2).

    Raises:
        OSError: the kernel refused (EBUSY, EINVAL for a path that is not a mount point, ...).
    """
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")

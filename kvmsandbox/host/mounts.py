"""Mounts the host makes below a directory a guest can write, made and unmounted exactly.

A mount is built detached (``fsopen``/``fsmount`` for an overlay, ``open_tree(OPEN_TREE_CLONE)``
for a bind), its attributes set on the whole tree at once (``mount_setattr(AT_RECURSIVE)``: a
read-only bind is read-only all the way down), its id read from the detached mount's fd, and only
then attached with ``move_mount`` onto an fd of the target that was opened without following links
(see ``beneath``). The id is what is recorded; unmounting looks the id up in the kernel's mount
table, opens that mount point again without following links, checks the id of what it opened and
detaches through that fd. No path a guest could have replaced is ever handed to mount or umount.
Linux 5.12 or later.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.host.beneath import fd_path, openat2, opened_dir

_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_MOUNT_SETATTR = 442

AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MNT_DETACH = 2

# Whatever a guest writes must stay inert for host processes: no device nodes, no setuid.
GUEST_WRITABLE = MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` is on (as in /proc/self/mountinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.EINVAL, f"no mnt_id for fd {fd}")


def overlay(lower_dirs: list[Path], upper: Path, work: Path, attrs: int = GUEST_WRITABLE) -> int:
    """A detached overlay mount (its fd): ``lower_dirs`` top first, read-only, under ``upper``.

    Raises:
        OSError: the kernel refused (the message says which step and why).
    """
    fs = _check(_libc.syscall(_SYS_FSOPEN, b"overlay", 1), "fsopen overlay")
    try:
        options = {"lowerdir": ":".join(str(d) for d in lower_dirs), "upperdir": str(upper), "workdir": str(work)}
        for key, value in options.items():
            _check(
                _libc.syscall(_SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0),
                f"overlay option {key}={value}",
            )
        _check(_libc.syscall(_SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "overlay create")
        return _check(_libc.syscall(_SYS_FSMOUNT, fs, 1, attrs), "fsmount overlay")
    finally:
        os.close(fs)


def clone_tree(source: Path, attrs: int) -> int:
    """A detached recursive bind of ``source`` (a host path the host trusts), ``attrs`` (e.g.
    read-only, nosuid, nodev) set on every mount of it.

    Raises:
        OSError: the kernel refused.
    """
    flags = OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, -100, os.fsencode(source), flags), f"clone {source}")
    try:
        attr = _MountAttr(attrs, 0, 0, 0)
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)
            ),
            f"set the attributes of {source}",
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(mount_fd: int, target_fd: int) -> int:
    """Attaches the detached mount ``mount_fd`` onto exactly what ``target_fd`` names; returns the
    mount's id.

    Raises:
        OSError: the kernel refused.
    """
    mid = mount_id(mount_fd)
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    _check(_libc.syscall(_SYS_MOVE_MOUNT, mount_fd, b"", target_fd, b"", flags), "move_mount")
    return mid


def unescape_mountinfo(field: str) -> str:
    """A path as /proc/self/mountinfo writes it, its octal escapes (space, tab, newline, backslash)
    turned back into the characters."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and all(c in "01234567" for c in field[i + 1 : i + 4]):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountEntry:
    id: int
    parent_id: int
    mount_point: str


def mount_table() -> list[MountEntry]:
    """The kernel's mount table: it writes the real path of each mount, so no link a guest made
    changes what is listed."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            entries.append(MountEntry(int(fields[0]), int(fields[1]), unescape_mountinfo(fields[4])))
    return entries


def mounts_below(path: Path) -> list[MountEntry]:
    """The mounts at or below ``path`` (a real path), deepest first."""
    root = str(path).rstrip("/")
    found = [m for m in mount_table() if m.mount_point == root or m.mount_point.startswith(root + "/")]
    return sorted(found, key=lambda m: m.mount_point.count("/"), reverse=True)


def detach(root: Path, expected_id: int) -> bool:
    """Detaches the mount ``expected_id`` if it is (still) below ``root``: found in the mount table,
    reached from ``root`` without following links, checked by id, detached through that fd (lazily:
    a QEMU 9p server may still hold a file in it; the fd itself holds it too). False when it is
    not there.

    Raises:
        OSError: umount2 failed for another reason than the mount being gone.
    """
    real_root = os.path.realpath(root)
    where = [m.mount_point for m in mount_table() if m.id == expected_id]
    if not where or not (where[0] + "/").startswith(real_root.rstrip("/") + "/"):
        return False
    rel = os.path.relpath(where[0], real_root)
    with opened_dir(real_root) as root_fd:
        try:
            fd = os.dup(root_fd) if rel == "." else openat2(root_fd, rel, os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            if mount_id(fd) != expected_id:
                return False
            if _libc.umount2(fd_path(fd).encode(), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err == errno.EINVAL:
                    return False
                raise OSError(err, f"umount {where[0]}: {os.strerror(err)}")
            return True
        finally:
            os.close(fd)

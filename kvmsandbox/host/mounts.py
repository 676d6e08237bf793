"""Mounts the host makes below a directory a guest can write, made and unmounted exactly.

A mount is built detached (``fsopen``/``fsmount`` for an overlay, ``open_tree(OPEN_TREE_CLONE)``
for a bind), its attributes set on the whole tree at once (``mount_setattr(AT_RECURSIVE)``: a
read-only bind is read-only all the way down), its id read from the detached mount's fd, and only
then attached with ``move_mount`` onto an fd of the target that was opened without following links
(see ``beneath``). Every mount is private: nothing propagates between it and the host's mounts.
The id is what is recorded; unmounting looks the id up in the kernel's mount table, opens that
mount point again without following links, checks the id of what it opened and that nothing is
stacked on it, and detaches through that fd. No path a guest could have replaced is ever handed
to mount or umount. Linux 6.8 or later (``lowerdir+`` by fd).
"""

from __future__ import annotations

import contextlib
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
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MNT_DETACH = 2
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

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


def mount_id(fd: int, proc: int | None = None) -> int:
    """The id of the mount ``fd`` is on (as in /proc/self/mountinfo); ``proc``: an fd of /proc,
    for a process whose mount namespace has none."""
    if proc is None:
        raw = Path(f"/proc/self/fdinfo/{fd}").read_text()
    else:
        info = os.open(f"self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        try:
            raw = os.read(info, 4096).decode()
        finally:
            os.close(info)
    for line in raw.splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    raise OSError(errno.EINVAL, f"no mnt_id for fd {fd}")


def set_attrs(fd: int, attrs: int = 0, *, private: bool = False, slave: bool = False, recursive: bool = True) -> None:
    """mount_setattr(2) on the mount ``fd`` is the root of and (``recursive``) every mount below
    it: ``attrs`` (read-only, nosuid, nodev) set; with ``private`` no propagation to or from any
    other mount (a host path's submounts, the state dir's peers); with ``slave`` propagation from
    the mount's peers (the host's) only, never back.

    Raises:
        OSError: the kernel refused.
    """
    attr = _MountAttr(attrs, 0, MS_PRIVATE if private else MS_SLAVE if slave else 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr")


def share(fd: int) -> None:
    """Makes the mount ``fd`` is the root of (not those below it) shared: a mount made or removed
    on it later is made or removed on its copies in other mount namespaces too (the virtio-fs
    daemon's, which sees the shared dir as a slave of the host's).

    Raises:
        OSError: the kernel refused.
    """
    attr = _MountAttr(0, 0, MS_SHARED, 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)), "share")


def overlay(lower_dirs: list[Path], upper: Path, work: Path, attrs: int = GUEST_WRITABLE) -> int:
    """A detached, private overlay mount (its fd): ``lower_dirs`` top first, read-only, under
    ``upper``. Every layer is handed to the kernel as an fd (``lowerdir+``, Linux 6.8), so neither
    the 255-byte option limit nor a ':' in a path matters.

    Raises:
        OSError: the kernel refused (the message says which step and why).
    """
    fs = _check(_libc.syscall(_SYS_FSOPEN, b"overlay", 1), "fsopen overlay")
    try:
        for key, path in [*(("lowerdir+", d) for d in lower_dirs), ("upperdir", upper), ("workdir", work)]:
            dfd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _check(
                    _libc.syscall(_SYS_FSCONFIG, fs, FSCONFIG_SET_FD, key.encode(), None, dfd),
                    f"overlay {key} {path}",
                )
            finally:
                os.close(dfd)
        _check(_libc.syscall(_SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "overlay create")
        return _check(_libc.syscall(_SYS_FSMOUNT, fs, 1, attrs), "fsmount overlay")
    finally:
        os.close(fs)


def clone_tree(source: Path, attrs: int, *, top_attrs: int = 0, private: bool = True) -> int:
    """A detached recursive bind of ``source`` (a host path the host trusts), ``attrs`` (e.g.
    read-only, nosuid, nodev) set on every mount of it and ``top_attrs`` on its own mount only;
    private: a mount the host makes or removes below ``source`` later is not seen in the clone,
    and detaching the clone never unmounts anything of the host's. Not ``private``: a slave of
    ``source``'s mounts from the start (never their peer, so nothing done to the clone, even
    after a failure half-way, goes back to them).

    Raises:
        OSError: the kernel refused.
    """
    flags = OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, -100, os.fsencode(source), flags), f"clone {source}")
    try:
        set_attrs(fd, attrs, private=private, slave=not private)
        if top_attrs:
            set_attrs(fd, top_attrs, recursive=False)
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach(mount_fd: int, target_fd: int, *, slave: bool = False, proc: int | None = None) -> int:
    """Attaches the detached mount ``mount_fd`` onto exactly what ``target_fd`` names and keeps it
    private (attaching below a shared mount would share it again), or with ``slave`` makes it a
    slave of the peers it was cloned from (mounts the host makes there later appear in it, nothing
    goes back); returns the mount's id.

    Raises:
        OSError: the kernel refused.
    """
    mid = mount_id(mount_fd, proc)
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    _check(_libc.syscall(_SYS_MOVE_MOUNT, mount_fd, b"", target_fd, b"", flags), "move_mount")
    set_attrs(mount_fd, private=not slave, slave=slave)
    return mid


def unescape_mountinfo(field: bytes) -> str:
    """A path as /proc/self/mountinfo writes it, its octal escapes (space, tab, newline, backslash)
    turned back into the bytes, decoded as the file system names are."""
    out, i = bytearray(), 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == 0x5C and len(octal) == 3 and all(0x30 <= c <= 0x37 for c in octal):
            out.append(int(octal, 8) & 0xFF)
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


@dataclass(frozen=True)
class MountEntry:
    id: int
    parent_id: int
    mount_point: str


def mount_table() -> list[MountEntry]:
    """The kernel's mount table: it writes the real path of each mount, so no link a guest made
    changes what is listed. Read as bytes and split on newlines only (the kernel escapes space,
    tab, newline and backslash, not a carriage return a guest may put in a name)."""
    entries = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f.read().split(b"\n"):
            fields = line.split(b" ")
            if len(fields) < 5 or not fields[0].isdigit() or not fields[1].isdigit():
                continue
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
            # umount2 acts on the topmost mount at that point: nothing may be stacked on this one.
            if any(m.parent_id == expected_id and m.mount_point == where[0] for m in mount_table()):
                return False
            # Whatever the mount's propagation became, its unmount goes to no mount of the host's.
            with contextlib.suppress(OSError):
                set_attrs(fd, private=True)
            if _libc.umount2(fd_path(fd).encode(), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err == errno.EINVAL:
                    return False
                raise OSError(err, f"umount {where[0]}: {os.strerror(err)}")
            return True
        finally:
            os.close(fd)

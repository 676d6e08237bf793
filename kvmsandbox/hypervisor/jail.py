"""Starts a VMM in a jail: its own mount namespace whose root is an empty, read-only tmpfs holding
only /usr (read-only), the device nodes it needs and the files it is given, its own network (only
loopback), IPC and UTS namespaces; then with no capabilities, as an unprivileged uid and gid of its
own, with no_new_privs, exec.

Run by the qemu backend as ``python3 -I -S jail.py JSON`` (root, already in the VM's cgroups), so
this file uses the standard library only. JSON holds:
    root    an empty directory to build the jail on (the tmpfs hides it in the new namespace)
    uid, gid, groups
    files   {name: host path}: bound read-only at /vm/<name>
    devices names below /dev to bind (null, zero, urandom, random are always there)
    proc    (optional) mount /proc, showing the jail's own processes only (``hidepid=invisible``,
            ``subset=pid``): a VM template's RAM is an inherited memfd, named /proc/self/fd/N
    argv    the command; argv[0] is a path that exists inside the jail (e.g. under /usr or /vm)
Everything else the VMM needs (sockets, disks, the console log, the tap) it gets as open fds.
On failure it says why on stderr and exits 125.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
NO_ID = 0xFFFFFFFF
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = 155
ALWAYS_DEVICES = ("null", "zero", "urandom", "random")
SYSTEM_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
SYSTEM_FILES = ("/etc/ld.so.cache",)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _bind(source: str, target: str, *, readonly: bool, directory: bool) -> None:
    if not os.path.exists(source):
        raise OSError(2, f"{source} does not exist")
    if directory:
        os.mkdir(target, 0o755)
    else:
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    # Not recursive: a mount below /usr would keep its own flags (and nothing needs one).
    _mount(source, target, None, MS_BIND)
    if readonly:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build(root: str, files: dict[str, str], devices: list[str], proc: bool = False) -> None:
    """Mounts the jail's tree on ``root`` in the current (new) mount namespace."""
    _mount("jail", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k,nr_inodes=128")
    _bind("/usr", f"{root}/usr", readonly=True, directory=True)
    for name in SYSTEM_LINKS:
        host = f"/{name}"
        if os.path.islink(host):
            os.symlink(os.readlink(host), f"{root}/{name}")
        elif os.path.isdir(host):
            _bind(host, f"{root}/{name}", readonly=True, directory=True)
    os.mkdir(f"{root}/etc", 0o755)
    for path in SYSTEM_FILES:
        if os.path.isfile(path):
            _bind(path, f"{root}{path}", readonly=True, directory=False)
    os.mkdir(f"{root}/dev", 0o755)
    for name in dict.fromkeys([*ALWAYS_DEVICES, *devices]):
        if "/" in name or name.startswith("."):
            raise OSError(22, f"device name {name!r}")
        _bind(f"/dev/{name}", f"{root}/dev/{name}", readonly=False, directory=False)
    os.mkdir(f"{root}/vm", 0o755)
    for name, source in files.items():
        if "/" in name or name.startswith("."):
            raise OSError(22, f"file name {name!r}")
        _bind(source, f"{root}/vm/{name}", readonly=True, directory=False)
    if proc:
        os.mkdir(f"{root}/proc", 0o555)
        _mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible,subset=pid")
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def enter(root: str) -> None:
    """Makes ``root`` the root of this mount namespace; the old root is gone from it."""
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def drop_privileges(uid: int, gid: int, groups: list[int], last_cap: int) -> None:
    """No capability can come back (bounding set emptied, no_new_privs); then the ids, which
    clears the effective and permitted sets."""
    for cap in range(last_cap + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if (
        os.getresuid() != (uid, uid, uid)
        or os.getresgid() != (gid, gid, gid)
        or sorted(os.getgroups()) != sorted(groups)
    ):
        raise OSError(1, "the ids did not change")


def main(argv: list[str]) -> int:
    try:
        spec = json.loads(argv[1])
        uid, gid = int(spec["uid"]), int(spec["gid"])
        groups = [int(g) for g in spec["groups"]]
        # -1 (2^32-1) would leave an id unchanged: root.
        if not all(0 < i < NO_ID for i in (uid, gid, *groups)):
            raise ValueError("the jail needs non-root ids below 2^32-1")
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        # Its own network namespace (nothing but loopback): QEMU gets its tap and sockets as fds.
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
        if spec.get("proc"):
            flags |= CLONE_NEWCGROUP  # its /proc/self/cgroup names no pod
        _check(_libc.unshare(flags), "unshare")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        build(spec["root"], dict(spec["files"]), list(spec["devices"]), bool(spec.get("proc", False)))
        enter(spec["root"])
        drop_privileges(uid, gid, groups, last_cap)
        command = [str(a) for a in spec["argv"]]
        os.execv(command[0], command)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        print(f"kvmsandbox jail: {e}", file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Attaches a detached mount inside another process's mount namespace: the pod's virtio-fs daemon's.

A container's host paths are cloned here (``mounts.clone_tree``) and attached only where the daemon
that serves the pod's shared dir sees them, never in the node's mount namespace. So the node keeps
no copy of a host path's submounts: removing a directory a pod's mount sits on (kubelet cleaning a
volume, a tool removing its temp dir) works as with runc, and the kernel detaches the pod's copy.

setns(2) into a mount namespace needs a single-threaded process, and the runtime is not one: this
module is also a tiny program the runtime runs, with the detached mount as fd 3:

    python -m kvmsandbox.host.nsattach PID BASE REL dir|file private|slave   (prints the mount id)

BASE is the shared dir as the namespace sees it (``/`` for virtiofsd, pivoted into it), REL the
target below it (``mounts/<container>@<n>``), reached without following links.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

from kvmsandbox.host import beneath, mounts

CLONE_NEWNS = 0x00020000
TREE_FD = 3
TIMEOUT = 30.0


def other_namespace(pids: list[int]) -> int | None:
    """The first of ``pids`` whose mount namespace is not this process's. Raises nothing."""
    try:
        own = os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return None
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}/ns/mnt").st_ino != own:
                return pid
        except OSError:
            continue
    return None


def attach_in(pid: int, tree: int, base: str, rel: str, *, is_dir: bool, slave: bool) -> int:
    """Attaches the detached mount ``tree`` at ``base/rel`` in ``pid``'s mount namespace; returns its id.

    Raises:
        OSError: the helper failed (its words in the message).
    """
    args = [sys.executable, "-m", "kvmsandbox.host.nsattach", str(pid), base, rel]
    args += ["dir" if is_dir else "file", "slave" if slave else "private"]
    done = subprocess.run(
        args,
        pass_fds=(tree,),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={"PATH": os.defpath, "KVMSANDBOX_NSATTACH_FD": str(tree)},
    )
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        raise OSError(0, f"attach in the namespace of {pid}: {done.stderr.strip()[-300:] or done.returncode}")
    return int(done.stdout.strip())


def _setns(pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the mount namespace of {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    pid, base, rel, kind, propagation = argv
    tree = int(os.environ.get("KVMSANDBOX_NSATTACH_FD", TREE_FD))
    # The daemon's namespace has no /proc (its root is the shared dir): keep ours.
    proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _setns(int(pid))
    pinned, _, name = rel.partition("/")
    if not name or "/" in name or pinned != "mounts":
        raise OSError(0, f"not a host-path target: {rel!r}")
    with beneath.opened_dir(Path(base)) as shared:
        parent = beneath.openat2(shared, pinned, os.O_PATH | os.O_DIRECTORY)
        try:
            # The pinned dir is a mount of its own: the guest cannot have swapped it for a plain dir.
            if mounts.mount_id(parent, proc) == mounts.mount_id(shared, proc):
                raise OSError(0, f"{base}/{pinned} is not pinned")
            target = beneath.make_dirs(parent, name) if kind == "dir" else beneath.make_file(parent, name)
            try:
                print(mounts.attach(tree, target, slave=propagation == "slave", proc=proc))
            finally:
                os.close(target)
        finally:
            os.close(parent)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, ValueError) as e:
        print(f"nsattach: {e}", file=sys.stderr)
        sys.exit(1)

"""The virtio-fs daemon that serves a pod's shared dir to its VM.

QEMU only forwards the guest's FUSE requests (a vhost-user device on a unix socket); the file
system work happens in ``virtiofsd``, which runs as root but confines itself: its own mount, pid
and network namespaces, pivoted into the shared dir, under seccomp. So the VMM needs no access to
any host path, and a bug in it does not reach the host's files.

One daemon per pod, started before QEMU. Its pid and start time are kept next to its socket
(``virtiofsd.pid``; until it has exec'd, its command line is still the launcher's); it is also found
by its ``source=`` option, so a crash before that file was written leaves nothing that cannot be
found. It exits by itself when QEMU disconnects; ``stop`` is for the cases where QEMU never connected.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor.process import PROC, in_cgroups, launch_detached, start_time

PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
STDERR_LOG_NAME = "virtiofsd-stderr.log"
PID_FILE_NAME = "virtiofsd.pid"
# Every inode the guest has looked up holds an fd in the daemon: this bounds what a guest can
# make it hold (the kernel memory of 64 Ki open files, charged to the pod's cgroup).
MAX_OPEN_FILES = 65536
STOP_WAIT = 5.0


def find() -> str | None:
    """The virtiofsd binary: in PATH, else where Debian's QEMU and the Rust daemon put it. Raises nothing."""
    return shutil.which("virtiofsd") or next((p for p in PATHS if os.access(p, os.X_OK)), None)


def options(source: Path) -> str:
    """virtiofsd's ``-o`` value for ``source``. No xattrs (no file capabilities or security
    labels set from the guest), no CAP_MKNOD (no device node made in a host path a pod may write),
    no host locks the guest could hold, submounts announced so each host path keeps its own device
    number in the guest.

    Raises:
        HypervisorError: ``source`` has a comma (the option separator) or is relative.
    """
    if "," in str(source) or not source.is_absolute():
        raise HypervisorError(f"virtiofsd cannot export {source}: it needs an absolute path without ','")
    return (
        f"source={source},sandbox=namespace,cache=auto,announce_submounts,"
        "no_xattr,no_posix_lock,no_flock,modcaps=-mknod:-setfcap,log_level=warn"
    )


def start(source: Path, socket_path: Path, cgroup_procs: tuple[Path, ...] = ()) -> int:
    """Starts virtiofsd for ``source`` (a directory) listening on ``socket_path`` (made here,
    owned by this process; QEMU connects to it). Its stderr is kept (capped) next to the socket.
    Returns its pid (also written, with its start time, to PID_FILE_NAME next to the socket).

    Raises:
        HypervisorError: no virtiofsd here, or it could not be started.
    """
    binary = find()
    if binary is None:
        raise HypervisorError(
            f"virtio-fs needs virtiofsd, found neither in PATH nor at {' or '.join(PATHS)} (install qemu-system-x86)"
        )
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(socket_path))
        os.chmod(socket_path, 0o600)
        listener.listen(1)
        fd = listener.fileno()
        argv = [
            binary, f"--fd={fd}", "-o", options(source),
            f"--rlimit-nofile={MAX_OPEN_FILES}", "--thread-pool-size=0",
        ]  # fmt: skip
        pid, _ = launch_detached(in_cgroups(cgroup_procs, argv), socket_path.with_name(STDERR_LOG_NAME), (fd,))
        record = os.open(
            socket_path.with_name(PID_FILE_NAME), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        with open(record, "w") as f:
            f.write(f"{pid} {start_time(pid) or -1}\n")
    except OSError as e:
        raise HypervisorError(f"cannot start virtiofsd for {source}: {e.strerror or e}") from None
    finally:
        listener.close()
    return pid


def _recorded(path: Path) -> tuple[int, int] | None:
    try:
        pid, started = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return None
    return pid, started


def _kill(pid: int, started: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if start_time(pid) == started:  # checked with the pidfd held: not a reused pid
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def running_for(source: Path, proc: Path = PROC) -> list[int]:
    """Pids of the virtiofsd processes serving ``source`` (the daemon and its sandboxed child). Raises nothing."""
    return [int(e.name) for e in proc.iterdir() if e.name.isdigit() and serves(int(e.name), source, proc)]


def serves(pid: int, source: Path, proc: Path = PROC) -> bool:
    """True while ``pid`` is a virtiofsd serving ``source``. Raises nothing."""
    try:
        args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    wanted = f"source={source},".encode()
    return os.path.basename(args[0]) == b"virtiofsd" and any(a.startswith(wanted) for a in args)


def stop(source: Path, run_dir: Path) -> None:
    """Kills the daemon started for ``source`` with its socket in ``run_dir`` (by its recorded pid
    and start time, and whatever else serves ``source``) and waits until it is gone. Idempotent.

    Raises:
        HypervisorError: a daemon survived SIGKILL.
    """
    recorded = _recorded(run_dir / PID_FILE_NAME)
    if recorded is not None:
        _kill(*recorded)
    pids = running_for(source)
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if serves(pid, source):  # the pidfd holds the process: no reused pid is hit
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    deadline = time.monotonic() + STOP_WAIT
    while running_for(source) or (recorded is not None and start_time(recorded[0]) == recorded[1]):
        if time.monotonic() > deadline:
            raise HypervisorError(f"virtiofsd for {source} survived SIGKILL")
        time.sleep(0.02)

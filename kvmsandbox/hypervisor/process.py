"""Starting QEMU detached, finding and waiting for a VM's QEMU process by pid.

A pid alone is not proof: pids are reused. A process counts as the QEMU of VM `name` only while its
command line carries `-name guest=<name>,...` (both backends start QEMU that way).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from pathlib import Path

from kvmsandbox.errors import HypervisorError

PROC = Path("/proc")
# What is kept of QEMU's stderr over the VM's life (the rest is dropped).
STDERR_MAX_BYTES = 64 << 10


def read_pidfile(path: Path) -> int | None:
    """The pid written in `path`, or None if the file is missing or garbled. Raises nothing."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_qemu_of(pid: int, name: str, *, proc: Path = PROC) -> bool:
    """True while `pid` is a live QEMU started for VM `name`. Raises nothing."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    # A zombie has an empty cmdline, so an exited QEMU that nobody reaped yet counts as gone.
    args = raw.split(b"\0")
    wanted = f"guest={name}".encode()
    return any(
        flag == b"-name" and (value == wanted or value.startswith(wanted + b","))
        for flag, value in itertools.pairwise(args)
    )


def wait_gone(pid: int, started: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the process ``pid`` that started at ``started`` to exit
    (or become a zombie); True once it has. Raises nothing."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while start_time(pid) == started:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


# Joins every cgroup given before "--" (writing its own pid to each cgroup.procs), then execs the
# command after it: the process is accounted in those cgroups from its first allocation on.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def in_cgroups(procs_files: tuple[Path, ...], argv: list[str]) -> list[str]:
    """``argv`` run by a shell that first joins the cgroups of ``procs_files`` (none: ``argv``)."""
    if not procs_files:
        return argv
    return ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *(str(p) for p in procs_files), "--", *argv]


def launch_detached(argv: list[str], stderr_path: Path, pass_fds: tuple[int, ...] = ()) -> tuple[int, int]:
    """Starts ``argv`` in the background of a shell that exits at once, so QEMU is nobody's child
    here and outlives the runtime (what -daemonize did, which forks once the seccomp filter that
    denies spawning is in place); its working directory is /. Its stderr goes through a pipe to
    ``head``, which keeps the first STDERR_MAX_BYTES in ``stderr_path`` and then exits: a guest that
    makes QEMU report errors forever cannot fill the host's disk (QEMU ignores SIGPIPE; later
    messages are dropped). ``pass_fds`` stay open, at their numbers, in the command. Returns its pid
    and head's.

    Raises:
        HypervisorError: the shell could not start it.
    """
    read_end, write_end = os.pipe()
    pid_file = stderr_path.with_name("launch.pid")
    try:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as log_file:
            _detached(["head", "-c", str(STDERR_MAX_BYTES)], read_end, log_file.fileno(), None, pid_file)
        head = pid_file.read_text().strip()
        _detached(argv, subprocess.DEVNULL, subprocess.DEVNULL, write_end, pid_file, pass_fds)
        qemu = pid_file.read_text().strip()
    except OSError as e:
        raise HypervisorError(f"cannot start {argv[0]}: {e}") from None
    finally:
        os.close(read_end)
        os.close(write_end)
        pid_file.unlink(missing_ok=True)
    if not (qemu.isdigit() and head.isdigit()):
        raise HypervisorError(f"cannot start {argv[0]}: the launcher gave no pid")
    return int(qemu), int(head)


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None once it has exited (gone or a zombie):
    with the pid, it names one process (a pid is reused, the pair is not). Unlike the command line,
    it is there while the process execs. Raises nothing."""
    try:
        fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def wait_exited(pid: int, timeout: float) -> None:
    """Waits up to ``timeout`` s until ``pid`` has exited (or is a zombie). Raises nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes():
                return
        except OSError:
            return
        time.sleep(0.01)


def _detached(
    argv: list[str], stdin: int, stdout: int, stderr: int | None, pid_file: Path, pass_fds: tuple[int, ...] = ()
) -> None:
    """Runs ``argv`` with that stdio in the background of a shell that exits at once, writing the
    background pid to ``pid_file``.

    Raises:
        HypervisorError: the shell could not start it.
    """
    # A background command of a non-interactive shell gets /dev/null as stdin unless it says
    # otherwise: the shell's stdin is kept on a spare fd (one not passed on) and given back.
    spare = next((n for n in range(3, 10) if n not in pass_fds), None)
    if spare is None:
        raise HypervisorError(f"cannot start {argv[0]}: fds 3-9 are all passed, none left for the launcher")
    script = f'exec {spare}<&0; "$@" <&{spare} {spare}<&- & echo $! > "$KVMSANDBOX_PID_FILE"'
    env = {"PATH": os.environ.get("PATH", os.defpath), "KVMSANDBOX_PID_FILE": str(pid_file)}
    try:
        shell = subprocess.run(
            ["/bin/sh", "-c", script, "sh", *argv],
            stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL if stderr is None else stderr,
            env=env, cwd="/", timeout=10, check=False, start_new_session=True, pass_fds=pass_fds,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HypervisorError(f"cannot start {argv[0]}: {e}") from None
    if shell.returncode != 0:
        raise HypervisorError(f"cannot start {argv[0]} (launcher status {shell.returncode})")

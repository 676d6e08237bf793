"""Signals for the command a ``crun exec`` runs (crun waits for it as its parent)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def signal_exec(crun_pid: int, pid_file: Path, sig: int) -> None:
    """Signals the command ``crun exec`` (``crun_pid``) runs: the pid crun wrote, taken through a
    pidfd and only while crun is still its parent (a pid freed and reused is not hit). Until the
    file is there (crun is starting it), waits up to a second; then crun itself gets the signal.
    Raises nothing."""
    deadline = time.monotonic() + 1.0
    while True:
        pid = _exec_pid(pid_file)
        if pid:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(crun_pid, sig)
            return
        time.sleep(0.02)
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # gone already
    try:
        if _parent(pid) == crun_pid:
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read(4096).rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _exec_pid(pid_file: Path) -> int:
    """The pid crun wrote for an exec'd command (0 while it has not): crun's own file in the
    bundle, which no container can write; read with a bound."""
    try:
        with open(pid_file, "rb") as f:
            text = f.read(32).strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() and 1 < int(text) < 1 << 22 else 0

"""Finding and waiting for a VM's QEMU process by pid, shared by both backends.

A pid alone is not proof: pids are reused. A process counts as the QEMU of VM `name` only while its
command line carries `-name guest=<name>,...` (both backends start QEMU that way).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

PROC = Path("/proc")


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


def wait_gone(pid: int, name: str, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the QEMU of `name` at `pid` to exit; True once it has.

    Raises nothing.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while is_qemu_of(pid, name):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True

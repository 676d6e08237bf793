"""Debug shells: processes the host starts in the guest itself, outside every container (an
operator's console into the VM). They run as the agent does, in the guest's namespaces, with a
terminal of their own (a new session whose controlling terminal it is) or pipes."""

from __future__ import annotations

import os
from typing import Any

from kvmsandbox.agent.guest.errors import AgentFault, FailedPrecondition, InvalidArgument
from kvmsandbox.agent.guest.process import Exit, OutputBuffer
from kvmsandbox.agent.guest.reaper import Reaper
from kvmsandbox.agent.guest.stdio import Input, Stdio

# Shells one guest runs at once.
MAX_SHELLS = 8


def start(reaper: Reaper, name: str, process: dict[str, Any], stdin: bool, running: int) -> tuple[int, Exit, Stdio]:
    """Starts ``process.args`` (checked already) as a debug shell.

    Raises:
        FailedPrecondition: MAX_SHELLS run already. InvalidArgument: no such program.
        AgentFault: it could not be started.
    """
    if running >= MAX_SHELLS:
        raise FailedPrecondition(f"{MAX_SHELLS} debug shells run already in this guest")
    args = list(process["args"])
    if not os.access(args[0], os.X_OK):
        raise InvalidArgument(f"no program {args[0]!r} in the guest")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "TERM": "xterm"}
    env.update(e.split("=", 1) for e in process.get("env", []) if "=" in e)
    if process.get("terminal"):
        return _with_terminal(reaper, name, args, env, process.get("consoleSize") or {})
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1)
    actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    try:
        pid = os.posix_spawn(args[0], args, env, file_actions=actions, setsid=True)
    except (OSError, ValueError) as e:
        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                os.close(fd)
        raise AgentFault(f"cannot start {args[0]}: {e}") from None
    finally:
        for fd in (out_w, err_w, in_r):
            os.close(fd)
    exit_ = _watch(reaper, pid)
    stdio = Stdio(OutputBuffer(out_r, f"{name}-stdout"), OutputBuffer(err_r, f"{name}-stderr"), None)
    if in_w >= 0:
        stdio.input = Input(in_w, terminal=False)
    return pid, exit_, stdio


def _with_terminal(
    reaper: Reaper, name: str, args: list[str], env: dict[str, str], size: dict[str, int]
) -> tuple[int, Exit, Stdio]:
    master, slave = os.openpty()
    terminal = Input(master, terminal=True)
    if size.get("width") and size.get("height"):
        terminal.resize(int(size["width"]), int(size["height"]))
    try:
        # After setsid, opening the terminal makes it the shell's controlling terminal (job control).
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.ttyname(slave), os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        pid = os.posix_spawn(args[0], args, env, file_actions=actions, setsid=True)
    except (OSError, ValueError) as e:
        terminal.close()
        raise AgentFault(f"cannot start {args[0]}: {e}") from None
    finally:
        os.close(slave)
    exit_ = _watch(reaper, pid)  # first: whatever fails below, the shell is reaped
    empty_r, empty_w = os.pipe()
    os.close(empty_w)
    stdio = Stdio(OutputBuffer(os.dup(master), f"{name}-tty"), OutputBuffer(empty_r, f"{name}-stderr"), terminal)
    return pid, exit_, stdio


def _watch(reaper: Reaper, pid: int) -> Exit:
    exit_ = Exit()
    reaper.spawned()
    reaper.watch(pid, exit_.set_status)
    return exit_


def kill_session(sid: int, sig: int) -> None:
    """Signals every process of the session a shell leads (its job-control groups too). Raises
    nothing."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read(4096).rsplit(b")", 1)[1].split()
            if int(fields[3]) == sid:  # after ")": state, ppid, pgrp, session
                os.kill(int(entry), sig)
        except (OSError, IndexError, ValueError):
            continue

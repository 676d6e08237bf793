"""Reaping of every child of the agent, which is PID 1 in the guest.

As PID 1 the agent inherits every orphan, container processes included (``crun create`` exits and
leaves the container's init to us). A single thread collects every exit status with
``waitpid(-1)``; processes the agent cares about register a callback for their pid. Nothing else
in the agent may call ``wait``: it would steal statuses from this thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

ExitCallback = Callable[[int], None]

PR_SET_CHILD_SUBREAPER = 36
# Statuses of pids nobody watched yet: a container can exit before its pid file was read.
UNCLAIMED_LIMIT = 4096


class Reaper:
    """Collects exit statuses of all children and hands them to whoever watches the pid."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watchers: dict[int, ExitCallback] = {}
        self._unclaimed: OrderedDict[int, int] = OrderedDict()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)

    def start(self) -> None:
        """Starts the reaping thread; outside PID 1 the agent becomes a child subreaper first."""
        if os.getpid() != 1:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self._thread.start()

    def spawned(self) -> None:
        """Tells the reaper that a child exists now (it sleeps while there are none)."""
        with self._cond:
            self._cond.notify_all()

    def watch(self, pid: int, callback: ExitCallback) -> None:
        """Calls ``callback(wait_status)`` once ``pid`` exits (at once if it exited already)."""
        with self._cond:
            status = self._unclaimed.pop(pid, None)
            if status is None:
                self._watchers[pid] = callback
                return
        callback(status)

    def _run(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self._cond:
                    self._cond.wait(timeout=0.2)
                continue
            except InterruptedError:
                continue
            with self._cond:
                callback = self._watchers.pop(pid, None)
                if callback is None:
                    self._unclaimed[pid] = status
                    while len(self._unclaimed) > UNCLAIMED_LIMIT:
                        self._unclaimed.popitem(last=False)
            if callback is not None:
                callback(status)


def exit_code_of(status: int) -> tuple[int, int]:
    """(exit code as a shell reports it, signal number or 0) for a wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), 0

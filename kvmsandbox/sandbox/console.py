"""Every sandbox's console log kept below ``sandbox.console_log_max_bytes``: one sweep over all
sandboxes, run by the server every ``SWEEP_SECONDS`` (no thread per pod), cuts each file past three
quarters of the cap back to its last half. The quarter left is the room for what the guest writes
between two sweeps: the cap holds against a guest writing up to a quarter of it per sweep interval
(512 KiB/s at the default cap; a flood under TCG measured 0.45 MB/s), and past that is exceeded by
the difference only, never for longer than a sweep interval.

A sweep costs one lstat per sandbox whose log is under the trigger (microseconds each).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.errors import KvmSandboxError
from kvmsandbox.host import console_log
from kvmsandbox.sandbox.context import SandboxContext

log = logging.getLogger(__name__)

SWEEP_SECONDS = 0.5
TAIL_LINES = 25
TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class SweepResult:
    checked: int
    trimmed: int
    dropped_bytes: int
    seconds: float


def console_tail(ctx: SandboxContext, sandbox_id: str, lines: int = TAIL_LINES) -> str:
    """The last lines of a sandbox's console log (at most its last TAIL_BYTES are read)."""
    try:
        text = console_log.read_tail(ctx.console_log(sandbox_id), TAIL_BYTES).decode(errors="replace")
    except OSError:
        return "(no console output)"
    tail = [line.rstrip("\r") for line in text.splitlines()[-lines:]]
    return "\n".join(tail) or "(no console output)"


class ConsoleSweeper:
    """Trims the console logs of every sandbox the store knows; a file that cannot be trimmed (a
    link or a device in its place) is logged once, then skipped quietly while it stays so."""

    def __init__(self, ctx: SandboxContext) -> None:
        self.ctx = ctx
        self._failing: set[str] = set()

    def sweep(self) -> SweepResult:
        t0 = time.monotonic()
        cap = self.ctx.config.sandbox.console_log_max_bytes
        ids = self.ctx.store.ids()
        trimmed = dropped = 0
        for sandbox_id in ids:
            n = 0
            for path in [self.ctx.console_log(sandbox_id), *self._vmm_logs(sandbox_id)]:
                try:
                    n += console_log.trim(path, cap - cap // 4, cap // 2)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if sandbox_id not in self._failing:
                        log.warning("sandbox %s: cannot bound its log %s: %s", sandbox_id, path, e)
                        self._failing.add(sandbox_id)
                    break
            else:
                self._failing.discard(sandbox_id)
            if n:
                log.info("sandbox %s: dropped the oldest %d bytes of its console log", sandbox_id, n)
                trimmed += 1
                dropped += n
        self._failing &= set(ids)
        return SweepResult(len(ids), trimmed, dropped, time.monotonic() - t0)

    def _vmm_logs(self, sandbox_id: str) -> tuple[Path, ...]:
        try:
            return self.ctx.hypervisor.vmm_logs(self.ctx.store.get(sandbox_id).vm_name)
        except KvmSandboxError:
            return ()

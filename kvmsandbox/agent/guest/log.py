"""One line per event on the guest console, which the host keeps in the sandbox's console log."""

from __future__ import annotations

import sys
import time


def uptime() -> float:
    """Seconds since the guest kernel started."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def traceback() -> None:
    """Prints the exception being handled (imported late: the module costs boot time under TCG)."""
    import traceback as tb

    tb.print_exc()


def event(name: str, **fields: object) -> None:
    """Writes ``kvmsandbox-agent: <name> k=v ...`` to stderr (the console when the agent is PID 1)."""
    parts = [f"kvmsandbox-agent: {name}"]
    try:
        parts.append(f"uptime={uptime():.3f}")
    except OSError:
        parts.append(f"time={time.time():.3f}")
    parts += [f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}" for k, v in fields.items()]
    sys.stderr.write(" ".join(parts) + "\n")
    sys.stderr.flush()

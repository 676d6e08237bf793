"""Saving a template VM's device state and restoring a clone from it, over QMP (qemu backend).

The guest's RAM is not in the state: a template's RAM lives in a shared memfd (VMSpec.template),
and with the ``x-ignore-shared`` capability migration skips it. QEMU 7.2 has no ``file:`` URI and
its seccomp filter forbids ``exec:``, so the state goes through an fd the runtime opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from kvmsandbox.errors import HypervisorError

IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
POLL_SECONDS = 0.005
STATE_FD_NAME = "template-state"


def save(qmp_socket: Path, state_fd: int, timeout: float) -> dict[str, Any]:
    """Stops the VM and writes its device state to ``state_fd``; returns QEMU's migration report.
    The VM stays stopped (the caller ends it).

    Raises:
        HypervisorError: QEMU refused or failed, or took longer than ``timeout`` seconds.
    """

    async def run(client: QMPClient) -> dict[str, Any]:
        await client.execute("stop")
        await client.execute("migrate-set-capabilities", IGNORE_SHARED)
        client.send_fd_scm(state_fd)
        await client.execute("getfd", {"fdname": STATE_FD_NAME})
        await client.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
        return await _migration_done(client)

    report: dict[str, Any] = _with_client(qmp_socket, run, timeout, "save the template's state")
    return report


def save_to_file(qmp_socket: Path, state_path: Path, timeout: float) -> dict[str, Any]:
    """``save`` into ``state_path`` (created, mode 0600). Raises HypervisorError."""
    try:
        fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise HypervisorError(f"cannot create {state_path}: {e.strerror}") from None
    try:
        return save(qmp_socket, fd, timeout)
    finally:
        os.close(fd)


def restore(qmp_socket: Path, incoming_fd: int, timeout: float) -> float:
    """Loads a clone's device state from ``incoming_fd`` (an fd QEMU inherited, started with
    ``-incoming defer``) and lets it run; returns the seconds the load took.

    Raises:
        HypervisorError: the state did not load (a corrupt or foreign file), or took longer than
        ``timeout`` seconds.
    """

    async def run(client: QMPClient) -> float:
        started = time.monotonic()
        await client.execute("migrate-set-capabilities", IGNORE_SHARED)
        await client.execute("migrate-incoming", {"uri": f"fd:{incoming_fd}"})
        await _migration_done(client)
        # The template was stopped when saved, and so is its clone: it runs from here.
        await client.execute("cont")
        return time.monotonic() - started

    seconds: float = _with_client(qmp_socket, run, timeout, "restore the clone")
    return seconds


async def _migration_done(client: QMPClient) -> dict[str, Any]:
    while True:
        answer = await client.execute("query-migrate")
        report: dict[str, Any] = answer if isinstance(answer, dict) else {}
        status = report.get("status")
        if status == "completed":
            return report
        if status in ("failed", "cancelled"):
            raise HypervisorError(f"migration {status}: {str(report.get('error-desc', ''))[:500]}")
        await asyncio.sleep(POLL_SECONDS)


def _with_client(qmp_socket: Path, run: Any, timeout: float, what: str) -> Any:
    async def main() -> Any:
        client = QMPClient()
        try:
            async with asyncio.timeout(timeout):
                await client.connect(str(qmp_socket))
                return await run(client)
        finally:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.disconnect()

    try:
        return asyncio.run(main())
    except ExecuteError as e:
        raise HypervisorError(f"QEMU refused to {what}: {e}") from None
    except TimeoutError:
        raise HypervisorError(f"QEMU did not {what} within {timeout:.0f} s") from None
    except (QMPError, OSError, EOFError) as e:
        raise HypervisorError(f"QMP at {qmp_socket} failed to {what}: {e!r}") from None

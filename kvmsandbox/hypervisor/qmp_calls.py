"""QMP exchanges of the qemu backend: a run of commands on one connection, with an fd handed
over first, waiting for unplugs to finish."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor import disks

# Seconds one QMP exchange (connect, a disk's attach or detach) may take.
QMP_TIMEOUT = 15.0


def qmp_run(
    socket_path: Path,
    commands: list[dict[str, Any]],
    *,
    fd: tuple[int, int] | None = None,
    tolerate_all: bool = False,
    timeout: float = 0.0,
) -> None:
    """Runs ``commands`` in order on one QMP connection; with ``fd`` (an fd, an fd set number),
    first hands the fd to QEMU and puts it in that fd set (``add-fd``). A command that fails stops
    the run with HypervisorError, unless it failed because what it removes is not there (or
    ``tolerate_all``).
    """

    async def run() -> None:
        client = QMPClient()
        try:
            async with asyncio.timeout(timeout or QMP_TIMEOUT):
                await client.connect(str(socket_path))
                if fd is not None:
                    client.send_fd_scm(fd[0])
                    await client.execute("add-fd", {"fdset-id": fd[1]})
                for command in commands:
                    try:
                        await _execute_when_free(client, command)
                    except ExecuteError as e:
                        removal = command["execute"] in disks.REMOVALS
                        if tolerate_all or (removal and any(t in str(e) for t in disks.NOT_THERE)):
                            continue
                        raise HypervisorError(f"QEMU refused {command['execute']}: {e}") from None
                    if command["execute"] == "device_del":
                        await _device_gone(client, str(command["arguments"]["id"]))
        finally:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.disconnect()

    try:
        asyncio.run(run())
    except (QMPError, OSError, EOFError, TimeoutError) as e:
        raise HypervisorError(f"QMP at {socket_path} failed: {e!r}") from None


async def _execute_when_free(client: QMPClient, command: dict[str, Any]) -> None:
    """Runs the command; a node still held by a device being finalised after its unplug is retried
    until it is free (QMP_TIMEOUT bounds the whole exchange)."""
    while True:
        try:
            await client.execute(command["execute"], command.get("arguments"))
            return
        except ExecuteError as e:
            if command["execute"] != "blockdev-del" or "is in use" not in str(e):
                raise
        await asyncio.sleep(0.02)


async def _device_gone(client: QMPClient, device_id: str) -> None:
    """Waits until QEMU has removed the device (an unplug may finish after device_del returns)."""
    while True:
        children = await client.execute("qom-list", {"path": "/machine/peripheral"})
        if not isinstance(children, list) or not any(
            isinstance(c, dict) and c.get("name") == device_id for c in children
        ):
            return
        await asyncio.sleep(0.02)

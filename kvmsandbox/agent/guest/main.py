"""Starts the agent: PID 1 duties, the reaper, the container runner, and the transports."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from kvmsandbox import __version__
from kvmsandbox.agent import wire
from kvmsandbox.agent.guest import init, log, misbehave
from kvmsandbox.agent.guest.reaper import Reaper
from kvmsandbox.agent.guest.rpc import AgentService
from kvmsandbox.agent.guest.runner import ContainerRunner
from kvmsandbox.agent.guest.server import SerialServer, VsockServer, find_serial_port, vsock_available

# Devices are probed asynchronously after their modules load; give them this long to show up.
DEVICE_WAIT_SECONDS = 10.0


def _wait_for_transports() -> tuple[Path | None, bool]:
    deadline = time.monotonic() + DEVICE_WAIT_SECONDS
    while True:
        port = find_serial_port()
        vsock = vsock_available()
        if port is not None or vsock or time.monotonic() > deadline:
            return port, vsock
        time.sleep(0.02)


def run() -> None:
    log.event("starting", version=__version__, pid=os.getpid())
    if os.getpid() == 1:
        init.setup_pid1()
    reaper = Reaper()
    reaper.start()
    runner = ContainerRunner(reaper)
    misbehave.arm()
    port, vsock = _wait_for_transports()
    if port is None and not vsock:
        raise RuntimeError(
            f"no agent channel: neither a virtio-serial port named {wire.AGENT_SERIAL_PORT_NAME} "
            "nor a vsock device appeared"
        )
    servers: list[SerialServer | VsockServer] = []
    if vsock:
        servers.append(VsockServer(wire.AGENT_VSOCK_PORT, AgentService(runner, "vsock").handle))
    if port is not None:
        servers.append(SerialServer(port, AgentService(runner, "virtio-serial").handle))
    for server in servers:
        threading.Thread(target=server.serve_forever, name=type(server).__name__, daemon=True).start()
    log.event("ready", transports=",".join(type(s).__name__ for s in servers))
    threading.Event().wait()


def main() -> int:
    try:
        run()
    except BaseException:
        log.traceback()
        log.event("fatal", pid=os.getpid())
        if os.getpid() == 1:
            init.power_off()
        return 1
    return 0

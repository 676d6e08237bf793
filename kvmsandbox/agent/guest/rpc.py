"""The agent's whole service surface: one thin method per RPC of ``service Agent``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError, Message

from kvmsandbox import __version__
from kvmsandbox.agent import wire
from kvmsandbox.agent.guest import log
from kvmsandbox.agent.guest.errors import AgentFault
from kvmsandbox.agent.guest.ports import PortConnections, PortRelays
from kvmsandbox.agent.guest.runner import ContainerRunner
from kvmsandbox.agent.guest.sandbox import SandboxSetup
from kvmsandbox.agent.v1 import agent_pb2 as pb

# Bounds the host cannot raise: a request may not pin an agent thread for long.
MAX_WAIT_SECONDS = 60.0
MAX_READ_BYTES = 1024 * 1024


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def self_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def guest_cpu_busy_seconds() -> float:
    """CPU time all CPUs spent not idle since boot: uptime x CPUs minus the idle time of
    /proc/uptime, which the kernel keeps precisely (the busy columns of /proc/stat are tick
    samples, too coarse for an idle guest)."""
    with open("/proc/uptime") as f:
        uptime, idle = (float(v) for v in f.read().split()[:2])
    return max(0.0, uptime * (os.cpu_count() or 1) - idle)


class AgentService:
    """Dispatches decoded requests to the runner and the sandbox setup."""

    def __init__(self, runner: ContainerRunner, transport: str) -> None:
        self.runner = runner
        self.sandbox = SandboxSetup(runner.reaper)
        self.ports = PortConnections()
        self.relays = PortRelays()
        self.transport = transport
        self._handlers: dict[str, Callable[[Any], Message]] = {name: getattr(self, name) for name in wire.METHODS}

    def handle(self, request: pb.Request) -> pb.Response:
        """Runs one request; every failure becomes a status, never an exception."""
        method = wire.METHODS.get(request.method)
        if method is None:
            return _error(request.id, pb.UNIMPLEMENTED, f"unknown method {request.method!r}")
        try:
            body = method.request_type.FromString(request.body)
        except DecodeError as e:
            return _error(request.id, pb.INVALID_ARGUMENT, f"malformed {request.method} request: {e}")
        try:
            reply = self._handlers[request.method](body)
        except AgentFault as e:
            log.event("request-failed", method=request.method, code=pb.Code.Name(e.code), error=str(e))
            return _error(request.id, e.code, str(e))
        except Exception as e:
            log.event("request-crashed", method=request.method, error=repr(e))
            log.traceback()
            return _error(request.id, pb.INTERNAL, f"{request.method} failed in the agent: {e!r}")
        return pb.Response(id=request.id, status=pb.Status(code=pb.OK), body=reply.SerializeToString())

    def Health(self, req: pb.HealthRequest) -> pb.HealthResponse:
        return pb.HealthResponse(agent_version=__version__)

    def GuestDetails(self, req: pb.GuestDetailsRequest) -> pb.GuestDetailsResponse:
        mem = meminfo()
        return pb.GuestDetailsResponse(
            agent_version=__version__,
            kernel_release=os.uname().release,
            mem_total_bytes=mem.get("MemTotal", 0),
            mem_available_bytes=mem.get("MemAvailable", 0),
            mem_free_bytes=mem.get("MemFree", 0),
            agent_rss_bytes=self_rss(),
            uptime_seconds=log.uptime(),
            online_cpus=os.cpu_count() or 1,
            transport=self.transport,
            oci_runtime=self.runner.crun_path(),
            agent_cpu_seconds=sum(os.times()[:2]),
            guest_cpu_busy_seconds=guest_cpu_busy_seconds(),
        )

    def CreateSandbox(self, req: pb.CreateSandboxRequest) -> pb.CreateSandboxResponse:
        return self.sandbox.create(req)

    def DestroySandbox(self, req: pb.DestroySandboxRequest) -> pb.DestroySandboxResponse:
        self.ports.close_all()
        self.runner.kill_shells()
        self.runner.remove_all()
        self.sandbox.destroy()
        return pb.DestroySandboxResponse()

    def CreateContainer(self, req: pb.CreateContainerRequest) -> pb.CreateContainerResponse:
        rootfs = req.rootfs if req.HasField("rootfs") else None
        pid = self.runner.create(req.container_id, req.oci_spec_json, rootfs, stdin=req.stdin)
        return pb.CreateContainerResponse(pid=pid)

    def StartContainer(self, req: pb.StartContainerRequest) -> pb.StartContainerResponse:
        self.runner.start(req.container_id)
        return pb.StartContainerResponse()

    def ExecProcess(self, req: pb.ExecProcessRequest) -> pb.ExecProcessResponse:
        return pb.ExecProcessResponse(pid=self.runner.exec(req.container_id, req.exec_id, req.process_json, req.stdin))

    def WaitProcess(self, req: pb.WaitProcessRequest) -> pb.WaitProcessResponse:
        timeout = min(req.timeout_ms / 1000, MAX_WAIT_SECONDS)
        info = self.runner.wait(req.container_id, req.exec_id, timeout)
        if info is None:
            return pb.WaitProcessResponse(exited=False)
        return pb.WaitProcessResponse(
            exited=True, exit_code=info.exit_code, signal=info.signal, finished_at_ns=info.finished_at_ns
        )

    def SignalProcess(self, req: pb.SignalProcessRequest) -> pb.SignalProcessResponse:
        self.runner.signal(req.container_id, req.exec_id, req.signal)
        return pb.SignalProcessResponse()

    def ReadStdio(self, req: pb.ReadStdioRequest) -> pb.ReadStdioResponse:
        data, offset, eof = self.runner.read_stdio(
            req.container_id,
            req.exec_id,
            req.stream,
            (req.offset, req.acknowledged),
            min(req.max_bytes or MAX_READ_BYTES, MAX_READ_BYTES),
            min(req.wait_ms / 1000, MAX_WAIT_SECONDS),
        )
        return pb.ReadStdioResponse(data=data, eof=eof, offset=offset, positioned=True)

    def RemoveContainer(self, req: pb.RemoveContainerRequest) -> pb.RemoveContainerResponse:
        self.runner.remove(req.container_id, req.force)
        return pb.RemoveContainerResponse()

    def ContainerStats(self, req: pb.ContainerStatsRequest) -> pb.ContainerStatsResponse:
        return self.runner.stats(req.container_id)

    def UpdateContainer(self, req: pb.UpdateContainerRequest) -> pb.UpdateContainerResponse:
        self.runner.update(req.container_id, req.resources_json)
        return pb.UpdateContainerResponse()

    def WriteStdin(self, req: pb.WriteStdinRequest) -> pb.WriteStdinResponse:
        wait = min(req.wait_ms / 1000, MAX_WAIT_SECONDS)
        return pb.WriteStdinResponse(
            written=self.runner.write_stdin(req.container_id, req.exec_id, req.data, req.close, wait)
        )

    def ResizeTerminal(self, req: pb.ResizeTerminalRequest) -> pb.ResizeTerminalResponse:
        self.runner.resize(req.container_id, req.exec_id, req.width, req.height)
        return pb.ResizeTerminalResponse()

    def OpenPort(self, req: pb.OpenPortRequest) -> pb.OpenPortResponse:
        return pb.OpenPortResponse(connection_id=self.ports.open(req.port))

    def ReadPort(self, req: pb.ReadPortRequest) -> pb.ReadPortResponse:
        max_bytes = min(req.max_bytes or MAX_READ_BYTES, MAX_READ_BYTES)
        data, eof = self.ports.read(req.connection_id, max_bytes, min(req.wait_ms / 1000, MAX_WAIT_SECONDS))
        return pb.ReadPortResponse(data=data, eof=eof)

    def WritePort(self, req: pb.WritePortRequest) -> pb.WritePortResponse:
        wait = min(req.wait_ms / 1000, MAX_WAIT_SECONDS)
        return pb.WritePortResponse(written=self.ports.write(req.connection_id, req.data, req.close_write, wait))

    def ClosePort(self, req: pb.ClosePortRequest) -> pb.ClosePortResponse:
        self.ports.close(req.connection_id)
        return pb.ClosePortResponse()

    def OpenPortRelay(self, req: pb.OpenPortRelayRequest) -> pb.OpenPortRelayResponse:
        return pb.OpenPortRelayResponse(relay_port=self.relays.open(req.port, req.token))

    def ListContainers(self, req: pb.ListContainersRequest) -> pb.ListContainersResponse:
        return pb.ListContainersResponse(containers=self.runner.list())


def _error(request_id: int, code: pb.Code.ValueType, message: str) -> pb.Response:
    return pb.Response(id=request_id, status=pb.Status(code=code, message=message))

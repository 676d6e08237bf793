"""The runtime's streaming front: the token store and the server, and what each kind of URL runs.
Exec streams a command's output from the guest as it comes, and its stdin and terminal in;
attach does the same for a running container's own process; port-forward copies connections to
ports in the pod, opened from inside its guest."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from kvmsandbox.config import StreamingConfig
from kvmsandbox.cri.streaming import portforward, remotecommand
from kvmsandbox.cri.streaming.portforward import Connection
from kvmsandbox.cri.streaming.remotecommand import Channels
from kvmsandbox.cri.streaming.server import StreamingServer
from kvmsandbox.cri.streaming.tokens import TokenStore
from kvmsandbox.sandbox.interactive import ProcessIO
from kvmsandbox.sandbox.manager import SandboxManager


@dataclass(frozen=True)
class ExecRequest:
    sandbox_id: str
    container_id: str
    cmd: tuple[str, ...]
    channels: Channels


@dataclass(frozen=True)
class AttachRequest:
    sandbox_id: str
    container_id: str
    channels: Channels


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str


Request = ExecRequest | AttachRequest | PortForwardRequest
KINDS: dict[type, str] = {ExecRequest: "exec", AttachRequest: "attach", PortForwardRequest: "portforward"}


class Streaming:
    """Issues URLs for Exec, Attach and PortForward and serves them; one per server."""

    def __init__(self, config: StreamingConfig, manager: SandboxManager) -> None:
        self._manager = manager
        self._tokens: TokenStore[Request] = TokenStore()
        self.server: StreamingServer[Request] = StreamingServer(
            config.address,
            config.port,
            self._resolve,
            self._serve,
            {
                "exec": remotecommand.PROTOCOLS,
                "attach": remotecommand.PROTOCOLS,
                "portforward": portforward.PROTOCOLS,
            },
        )

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def url(self, request: Request) -> str:
        """Raises ResourceExhausted when too many URLs wait for their client."""
        return self.server.url(KINDS[type(request)], self._tokens.issue(request))

    def exec_url(self, request: ExecRequest) -> str:
        return self.url(request)

    def _resolve(self, kind: str, token: str) -> Request | None:
        if kind not in KINDS.values():
            return None
        request = self._tokens.redeem(token)
        # A token is spent even on the wrong path: it was shown to someone who guessed the kind.
        return request if request is not None and KINDS[type(request)] == kind else None

    def _serve(self, kind: str, request: Request, protocol: str, sock: socket.socket, first: bytes) -> None:
        if isinstance(request, PortForwardRequest):
            sandbox_id = request.sandbox_id

            def connect(port: int) -> Connection:
                return self._manager.open_port(sandbox_id, port)

            portforward.serve_port_forward(sock, first, sandbox_id, connect)
            return
        if isinstance(request, AttachRequest):
            attach = request

            def run_attach(io: ProcessIO) -> int:
                return self._manager.attach(attach.sandbox_id, attach.container_id, io)

            remotecommand.serve_exec(sock, first, protocol, attach.channels, run_attach)
            return
        exec_request = request

        def run(io: ProcessIO) -> int:
            return self._manager.exec_streaming(
                exec_request.sandbox_id, exec_request.container_id, list(exec_request.cmd), io
            )

        remotecommand.serve_exec(sock, first, protocol, exec_request.channels, run)

"""The runtime's streaming front: the token store and the server, and what each kind of URL runs.
Exec streams a command's output from the guest as it comes, and its stdin and terminal in."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from kvmsandbox.config import StreamingConfig
from kvmsandbox.cri.streaming import remotecommand
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


class Streaming:
    """Issues URLs for Exec and serves them; one per server."""

    def __init__(self, config: StreamingConfig, manager: SandboxManager) -> None:
        self._manager = manager
        self._tokens: TokenStore[ExecRequest] = TokenStore()
        self.server: StreamingServer[ExecRequest] = StreamingServer(
            config.address, config.port, self._resolve, self._serve, {"exec": remotecommand.PROTOCOLS}
        )

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def exec_url(self, request: ExecRequest) -> str:
        """Raises ResourceExhausted when too many URLs wait for their client."""
        return self.server.url("exec", self._tokens.issue(request))

    def _resolve(self, kind: str, token: str) -> ExecRequest | None:
        return self._tokens.redeem(token) if kind == "exec" else None

    def _serve(self, kind: str, request: ExecRequest, protocol: str, sock: socket.socket, first: bytes) -> None:
        def run(io: ProcessIO) -> int:
            return self._manager.exec_streaming(request.sandbox_id, request.container_id, list(request.cmd), io)

        remotecommand.serve_exec(sock, first, protocol, request.channels, run)

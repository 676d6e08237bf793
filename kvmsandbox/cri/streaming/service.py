"""The runtime's streaming front: the token store and the server, and what each kind of URL runs.
Exec streams a command's output from the guest as it comes, and its stdin and terminal in;
attach does the same for a running container's own process; port-forward copies connections to
ports in the pod, opened from inside its guest."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.config import ConfigError, StreamingConfig
from kvmsandbox.cri.streaming import portforward, remotecommand, tls, websocket
from kvmsandbox.cri.streaming.portforward import Connection
from kvmsandbox.cri.streaming.remotecommand import Channels
from kvmsandbox.cri.streaming.server import StreamingServer
from kvmsandbox.cri.streaming.tokens import TokenStore
from kvmsandbox.cri.streaming.upgrade import Upgraded
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
        """Raises ConfigError: the TLS files cannot be used."""
        self._manager = manager
        self._tokens: TokenStore[Request] = TokenStore()
        context = None
        if config.tls_cert_file:
            try:
                context = tls.server_context(Path(config.tls_cert_file), Path(config.tls_key_file))
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"the streaming server's TLS certificate or key cannot be used: {e}") from None
        self.server: StreamingServer[Request] = StreamingServer(
            config.address,
            config.port,
            self._resolve,
            self._serve,
            {
                "spdy": {
                    "exec": remotecommand.PROTOCOLS,
                    "attach": remotecommand.PROTOCOLS,
                    "portforward": portforward.PROTOCOLS,
                },
                "websocket": {
                    "exec": remotecommand.WS_PROTOCOLS,
                    "attach": remotecommand.WS_PROTOCOLS,
                    "portforward": portforward.WS_PROTOCOLS,
                },
            },
            tls=context,
            idle_timeout=config.idle_timeout_seconds,
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

    def _serve(self, kind: str, request: Request, up: Upgraded) -> None:
        if isinstance(request, PortForwardRequest):
            sandbox_id = request.sandbox_id

            def connect(port: int) -> Connection:
                return self._manager.open_port(sandbox_id, port)

            if up.protocol == portforward.TUNNELLED_SPDY:
                plain, carrier = websocket.tunnel(up.sock, up.first)
                with plain:
                    portforward.serve_port_forward(plain, b"", sandbox_id, connect)
                carrier.join(5)
            elif up.transport == "websocket":
                ports = _query_ports(up.query)
                portforward.serve_port_forward_ws(up.sock, up.first, up.protocol, sandbox_id, ports, connect)
            else:
                portforward.serve_port_forward(up.sock, up.first, sandbox_id, connect)
            return

        def run(io: ProcessIO) -> int:
            if isinstance(request, AttachRequest):
                return self._manager.attach(request.sandbox_id, request.container_id, io)
            return self._manager.exec_streaming(request.sandbox_id, request.container_id, list(request.cmd), io)

        serve = remotecommand.serve_exec_ws if up.transport == "websocket" else remotecommand.serve_exec
        serve(up.sock, up.first, up.protocol, request.channels, run)


def _query_ports(query: dict[str, list[str]]) -> list[int]:
    """The ports of a WebSocket port-forward URL (``?port=80&port=8080``); bad ones are dropped
    (their connection is not made), at most MAX_WS_PORTS."""
    ports = []
    for value in query.get("port", [])[: portforward.MAX_WS_PORTS]:
        if re.fullmatch(r"[0-9]{1,5}", value) and 0 < int(value) < 65536:
            ports.append(int(value))
    return ports

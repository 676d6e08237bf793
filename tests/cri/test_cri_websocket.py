"""The WebSocket side of the streaming server against ``kvmsandbox serve`` and a real guest, with a
client made of wsproto's frame layer (as a Python Kubernetes client speaks it): exec with stdin
closed the v5 way, binary and base64 channels, a terminal sized through the resize channel, the
exit code on the error channel, and port-forward's port-prefixed channels."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from urllib.parse import urlsplit

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, TextMessage

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from tests.cri.conftest import CriServer
from tests.cri.test_cri_streaming import running  # noqa: F401 (a fixture)

pytestmark = pytest.mark.vm


class Channels:
    """A WebSocket session on a streaming URL; collects what arrives per channel until it closes."""

    def __init__(self, url: str, protocol: str, query: str = "") -> None:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {parts.path}{query} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: Upgrade\r\n"
            f"Upgrade: websocket\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101") and f"Sec-WebSocket-Protocol: {protocol}".encode() in head, head
        self.base64 = "base64" in protocol
        self.ws = Connection(ConnectionType.CLIENT)
        self.ws.receive_data(rest)
        self.received: dict[int, bytes] = {}
        self.closed = False
        self._message = b""

    def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            event: Message[bytes] | Message[str] = TextMessage(data=str(channel) + base64.b64encode(data).decode())
        else:
            event = BytesMessage(data=bytes([channel]) + data)
        self.sock.sendall(self.ws.send(event))

    def pump(self, until: float) -> None:
        """Reads until the server closes or ``until`` (monotonic) passes."""
        while not self.closed and time.monotonic() < until:
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    self.closed = True
                elif isinstance(event, Message):
                    self._message += event.data.encode() if isinstance(event.data, str) else event.data
                    if event.message_finished:
                        self._take(self._message)
                        self._message = b""
            if self.closed:
                break
            self.sock.settimeout(max(0.01, until - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            self.ws.receive_data(data or None)

    def _take(self, message: bytes) -> None:
        if self.base64:
            channel, data = message[0] - ord("0"), base64.b64decode(message[1:])
        else:
            channel, data = message[0], message[1:]
        self.received[channel] = self.received.get(channel, b"") + data

    def wait_closed(self, timeout: float = 120) -> dict[int, bytes]:
        self.pump(time.monotonic() + timeout)
        assert self.closed, self.received
        self.sock.close()
        return self.received


def exec_url(cri_server: CriServer, container: str, cmd: list[str], **flags: bool) -> str:
    request = cri.ExecRequest(container_id=container, cmd=cmd, **flags)
    return cri_server.runtime.Exec(request).url


def test_websocket_exec_v5_stdin_closed_then_output_and_status(cri_server: CriServer, running: str) -> None:  # noqa: F811
    url = exec_url(cri_server, running, ["sh", "-c", "cat; echo err >&2; exit 3"], stdin=True, stdout=True, stderr=True)
    session = Channels(url, "v5.channel.k8s.io")
    session.send(0, b"typed in\n")
    session.sock.sendall(session.ws.send(BytesMessage(data=bytes([255, 0]))))  # v5: stdin is over
    got = session.wait_closed()
    assert got[1] == b"typed in\n" and got[2] == b"err\n"
    status = json.loads(got[3])
    assert status["reason"] == "NonZeroExitCode" and status["details"]["causes"][0]["message"] == "3"


def test_websocket_exec_base64_with_a_terminal_sized_through_the_resize_channel(
    cri_server: CriServer,
    running: str,  # noqa: F811
) -> None:
    url = exec_url(cri_server, running, ["sh", "-c", "sleep 2; stty size; tty"], stdin=True, stdout=True, tty=True)
    session = Channels(url, "v4.base64.channel.k8s.io")
    session.send(4, json.dumps({"Width": 123, "Height": 45}).encode())
    got = session.wait_closed()
    assert b"45 123" in got[1] and b"/dev/pts/" in got[1], got
    assert json.loads(got[3])["status"] == "Success"


def test_websocket_port_forward_on_port_prefixed_channels(cri_server: CriServer, running: str) -> None:  # noqa: F811
    rt = cri_server.runtime
    rt.ExecSync(cri.ExecSyncRequest(container_id=running, cmd=["sh", "-c", "nc -ll -p 8081 -e cat &"], timeout=30))
    sandbox = next(
        c.pod_sandbox_id for c in rt.ListContainers(cri.ListContainersRequest()).containers if c.id == running
    )
    deadline = time.monotonic() + 60
    while b":8081" not in rt.ExecSync(cri.ExecSyncRequest(container_id=running, cmd=["netstat", "-ltn"])).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    url = rt.PortForward(cri.PortForwardRequest(pod_sandbox_id=sandbox, port=[8081])).url
    session = Channels(url, "v4.channel.k8s.io", query="?port=8081")
    session.pump(time.monotonic() + 30)
    while len(session.received.get(0, b"")) < 2 or len(session.received.get(1, b"")) < 2:
        session.pump(time.monotonic() + 5)
    prefix = (8081).to_bytes(2, "little")
    assert session.received[0] == prefix and session.received[1] == prefix
    session.send(0, b"over the websocket\n")
    deadline = time.monotonic() + 60
    while session.received[0] != prefix + b"over the websocket\n":
        assert time.monotonic() < deadline, session.received
        session.pump(time.monotonic() + 1)
    session.sock.sendall(session.ws.send(CloseConnection(code=1000)))
    session.wait_closed()

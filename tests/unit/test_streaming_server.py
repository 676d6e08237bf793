"""The streaming server's HTTP side on a real loopback socket: a token upgrades once to SPDY/3.1 with
the negotiated subprotocol, then frames flow; bad requests get the right status and a reason."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.cri.streaming import spdy, upgrade
from kvmsandbox.cri.streaming.server import StreamingServer
from kvmsandbox.cri.streaming.spdy_session import SpdySession, SpdyStream
from kvmsandbox.cri.streaming.tokens import TokenStore
from kvmsandbox.cri.streaming.websocket import WsSession

PROTOCOLS = {
    "spdy": {"exec": ("v4.channel.k8s.io", "v3.channel.k8s.io"), "portforward": ("portforward.k8s.io",)},
    "websocket": {"exec": ("v5.channel.k8s.io", "base64.channel.k8s.io")},
}


def echo(stream: SpdyStream) -> None:
    def run() -> None:
        while chunk := stream.read():
            stream.write(chunk)
        stream.close()

    threading.Thread(target=run, daemon=True).start()


@pytest.fixture
def server() -> Iterator[tuple[StreamingServer[str], TokenStore[tuple[str, str]], list[str]]]:
    tokens: TokenStore[tuple[str, str]] = TokenStore()
    served: list[str] = []

    def resolve(kind: str, token: str) -> str | None:
        found = tokens.redeem(token)
        return found[1] if found is not None and found[0] == kind else None

    def serve(kind: str, what: str, up: upgrade.Upgraded) -> None:
        served.append(f"{kind} {what} {up.protocol}")
        if up.transport == "spdy":
            SpdySession(up.sock, echo, up.first).serve()
            return
        # WebSocket: channel 0 is echoed back on channel 1 until the client closes channel 0.
        session = WsSession(up.sock, [0, 1], base64_framing="base64" in up.protocol, first=up.first)
        reader = threading.Thread(target=session.serve, daemon=True)
        reader.start()
        while chunk := session.channels[0].read():
            session.channels[1].write(chunk)
        session.close()
        reader.join(5)

    srv: StreamingServer[str] = StreamingServer("127.0.0.1", 0, resolve, serve, PROTOCOLS, max_sessions=4)
    srv.start()
    yield srv, tokens, served
    srv.stop()


def request(srv: StreamingServer[str], path: str, *headers: str) -> socket.socket:
    sock = socket.create_connection((srv.address, srv.port), timeout=10)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode())
    return sock


def response(sock: socket.socket) -> tuple[str, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode(), rest


SPDY = ("Connection: Upgrade", "Upgrade: SPDY/3.1")


def test_a_token_upgrades_once_to_spdy_with_the_clients_preferred_common_protocol(
    server: tuple[StreamingServer[str], TokenStore[tuple[str, str]], list[str]],
) -> None:
    srv, tokens, served = server
    token = tokens.issue(("exec", "c1"))
    url = srv.url("exec", token)
    assert url.startswith(f"http://127.0.0.1:{srv.port}/exec/")
    sock = request(
        srv, f"/exec/{token}", *SPDY, "X-Stream-Protocol-Version: v5.channel.k8s.io",
        "X-Stream-Protocol-Version: v3.channel.k8s.io, v4.channel.k8s.io",
    )  # fmt: skip
    head, rest = response(sock)
    assert head.startswith("HTTP/1.1 101 Switching Protocols")
    assert "Upgrade: SPDY/3.1" in head and "X-Stream-Protocol-Version: v3.channel.k8s.io" in head
    encoder, decoder = spdy.Encoder(), spdy.Decoder()
    sock.sendall(
        encoder.encode(spdy.SynStream(1, {"streamtype": ["stdin"]})) + encoder.encode(spdy.DataFrame(1, b"hi"))
    )
    frames: list[spdy.Frame] = decoder.feed(rest)
    while len(frames) < 2:
        frames += decoder.feed(sock.recv(4096))
    assert frames[:2] == [spdy.SynReply(1, {}), spdy.DataFrame(1, b"hi")]
    sock.close()
    assert served == ["exec c1 v3.channel.k8s.io"]
    again = request(srv, f"/exec/{token}", *SPDY)
    assert response(again)[0].startswith("HTTP/1.1 404 Not Found")


@pytest.mark.parametrize(
    ("path", "headers", "status", "words"),
    [
        ("/exec/{token}", ("X-Stream-Protocol-Version: v9.channel.k8s.io", *SPDY), "403", "unable to negotiate"),
        ("/exec/{token}", (), "400", "serves SPDY/3.1 and WebSocket upgrades"),
        ("/portforward/{token}", SPDY, "404", "no portforward request"),
        ("/exec/not-a-token", SPDY, "404", "unknown, used or expired"),
        ("/metrics", SPDY, "404", "no streaming endpoint"),
        ("/exec/{token}", ("X" * 20000 + ": 1",), "431", "request head over"),
        ("/exec/{token}", ("no colon here",), "400", "without a name"),
    ],
)
def test_bad_requests_get_a_status_and_a_reason(
    server: tuple[StreamingServer[str], TokenStore[tuple[str, str]], list[str]],
    path: str,
    headers: tuple[str, ...],
    status: str,
    words: str,
) -> None:
    srv, tokens, served = server
    token = tokens.issue(("exec", "c1"))
    sock = request(srv, path.format(token=token), *headers)
    head, body = response(sock)
    assert head.split(" ")[1] == status, head
    assert words in body.decode()
    assert served == []


def test_slow_or_idle_heads_are_dropped_and_bounded_apart_from_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upgrade, "REQUEST_TIMEOUT", 3.0)
    tokens: TokenStore[str] = TokenStore()
    sessions: list[str] = []

    def serve(kind: str, what: str, up: upgrade.Upgraded) -> None:
        sessions.append(what)
        SpdySession(up.sock, echo, up.first).serve()

    srv: StreamingServer[str] = StreamingServer(
        "127.0.0.1", 0, lambda kind, token: tokens.redeem(token), serve, PROTOCOLS, max_sessions=8, max_heads=3
    )
    srv.start()
    try:
        # A byte every half second: one deadline for the whole head, not one per read.
        slow = socket.create_connection((srv.address, srv.port), timeout=10)
        idle = [socket.create_connection((srv.address, srv.port), timeout=10) for _ in range(2)]
        started = time.monotonic()
        for _ in range(3):
            slow.sendall(b"P")
            time.sleep(0.5)
        extra = socket.create_connection((srv.address, srv.port), timeout=10)
        assert response(extra)[0].startswith("HTTP/1.1 503")  # three heads pending: no fourth
        for sock in (slow, *idle):
            assert response(sock)[0].startswith("HTTP/1.1 408")
            sock.close()
        assert time.monotonic() - started < 6
        # The heads gone, a real session gets in.
        token = tokens.issue("c1")
        ok = request(srv, f"/exec/{token}", *SPDY)
        assert response(ok)[0].startswith("HTTP/1.1 101")
        deadline = time.monotonic() + 5
        while not sessions and time.monotonic() < deadline:  # served after the 101 went out
            time.sleep(0.01)
        assert sessions == ["c1"]
        ok.close()
    finally:
        srv.stop()


RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class WsClient:
    """A WebSocket client made of wsproto's frame layer, after a hand-made handshake."""

    def __init__(
        self, srv: StreamingServer[str], path: str, *protocols: str, key: str = "dGhlIHNhbXBsZSBub25jZQ=="
    ) -> None:
        from wsproto.connection import Connection, ConnectionType

        self.sock = socket.create_connection((srv.address, srv.port), timeout=10)
        headers = [
            "Connection: Upgrade",
            "Upgrade: websocket",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ] + ([f"Sec-WebSocket-Protocol: {', '.join(protocols)}"] if protocols else [])
        self.sock.sendall(
            (f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()
        )
        self.head, rest = response(self.sock)
        self.ws = Connection(ConnectionType.CLIENT)
        self.ws.receive_data(rest)

    def send(self, event: object) -> None:
        self.sock.sendall(self.ws.send(event))  # type: ignore[arg-type]

    def events(self, until: type) -> list[object]:
        got: list[object] = []
        while not any(isinstance(e, until) for e in got):
            got += list(self.ws.events())
            if any(isinstance(e, until) for e in got):
                break
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)
        return got


def test_a_token_upgrades_to_a_websocket_with_channels_binary_and_base64(
    server: tuple[StreamingServer[str], TokenStore[tuple[str, str]], list[str]],
) -> None:
    import base64

    from wsproto.events import BytesMessage, CloseConnection, TextMessage

    srv, tokens, served = server
    path = "/exec/" + tokens.issue(("exec", "c1"))
    client = WsClient(srv, path, "v9.nothing", "v5.channel.k8s.io")
    assert client.head.startswith("HTTP/1.1 101")
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in client.head  # RFC 6455's example
    assert "Sec-WebSocket-Protocol: v5.channel.k8s.io" in client.head
    client.send(BytesMessage(data=b"\x00hel", message_finished=False))  # a message in fragments
    client.send(BytesMessage(data=b"lo"))
    client.send(BytesMessage(data=b"\x07to a channel nobody reads"))
    (echoed,) = [e for e in client.events(BytesMessage) if isinstance(e, BytesMessage)]
    assert echoed.data == b"\x01hello"
    big = os.urandom(300_000)  # arrives over many reads: wsproto hands it out in pieces
    client.send(BytesMessage(data=b"\x00" + big))
    got, starting = b"", True
    while len(got) < len(big):
        for e in client.events(BytesMessage):
            if isinstance(e, BytesMessage):  # a message may come in pieces: its channel byte first
                got += bytes(e.data)[1:] if starting else bytes(e.data)
                starting = e.message_finished
    assert got == big
    client.send(BytesMessage(data=bytes([255, 0])))  # v5: close stdin
    assert any(isinstance(e, CloseConnection) for e in client.events(CloseConnection))
    assert served == ["exec c1 v5.channel.k8s.io"]

    b64 = WsClient(srv, "/exec/" + tokens.issue(("exec", "c2")), "base64.channel.k8s.io")
    b64.send(TextMessage(data="0" + base64.b64encode(b"\x00\xffbin").decode()))
    b64.send(TextMessage(data="0not base64!"))  # dropped, the session goes on
    (text,) = [e for e in b64.events(TextMessage) if isinstance(e, TextMessage)]
    assert text.data == "1" + base64.b64encode(b"\x00\xffbin").decode()


def test_websocket_handshakes_and_messages_it_cannot_take_are_refused(
    server: tuple[StreamingServer[str], TokenStore[tuple[str, str]], list[str]],
) -> None:
    from wsproto.events import BytesMessage, CloseConnection

    srv, tokens, _ = server
    bad_version = request(srv, "/exec/" + tokens.issue(("exec", "c")), "Connection: Upgrade", "Upgrade: websocket")
    head, body = response(bad_version)
    assert head.startswith("HTTP/1.1 400") and b"Sec-WebSocket-Key" in body
    head = WsClient(srv, "/exec/" + tokens.issue(("exec", "c")), "v1.unknown").head
    assert head.startswith("HTTP/1.1 403")
    # A message over the bound ends the session with 1009, before it is all read.
    client = WsClient(srv, "/exec/" + tokens.issue(("exec", "c")), "v5.channel.k8s.io")
    client.send(BytesMessage(data=b"\x00" + b"x" * (2 << 20)))
    closes = [e for e in client.events(CloseConnection) if isinstance(e, CloseConnection)]
    assert closes[0].code == 1009


OPENSSL_SELF_SIGNED = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x"]


def test_with_tls_the_urls_are_https_and_a_session_works_through_it(tmp_path: Path) -> None:
    import ssl
    import subprocess

    from kvmsandbox.cri.streaming import tls

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [*OPENSSL_SELF_SIGNED, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    tokens: TokenStore[str] = TokenStore()

    def serve(kind: str, what: str, up: upgrade.Upgraded) -> None:
        SpdySession(up.sock, echo, up.first).serve()

    srv: StreamingServer[str] = StreamingServer(
        "127.0.0.1", 0, lambda k, t: tokens.redeem(t), serve, PROTOCOLS, tls=tls.server_context(cert, key)
    )
    srv.start()
    try:
        url = srv.url("exec", tokens.issue("c1"))
        assert url.startswith("https://127.0.0.1:")
        client_context = ssl.create_default_context(cafile=str(cert))
        client_context.check_hostname = False
        raw = socket.create_connection((srv.address, srv.port), timeout=10)
        sock = client_context.wrap_socket(raw)
        sock.sendall(
            f"POST {url.split(str(srv.port))[1]} HTTP/1.1\r\nHost: x\r\n{SPDY[0]}\r\n{SPDY[1]}\r\n"
            "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n".encode()
        )
        head, _ = response(sock)  # type: ignore[arg-type]
        assert head.startswith("HTTP/1.1 101"), head
        encoder, decoder = spdy.Encoder(), spdy.Decoder()
        payload = os.urandom(3 << 20)  # more than the bridge holds in a direction
        sock.sendall(encoder.encode(spdy.SynStream(1, {"streamtype": ["stdin"]})))
        got = b""

        def send() -> None:
            for i in range(0, len(payload), 60_000):
                sock.sendall(encoder.encode(spdy.DataFrame(1, payload[i : i + 60_000])))

        sender = threading.Thread(target=send)
        sender.start()
        while len(got) < len(payload):
            for frame in decoder.feed(sock.recv(65536)):
                if isinstance(frame, spdy.DataFrame):
                    got += frame.data
        sender.join(10)
        assert got == payload
        sock.close()
        # Plain HTTP to a TLS server: no answer, the connection is closed (or reset).
        plain = request(srv, "/exec/" + tokens.issue("c2"), *SPDY)
        with contextlib.suppress(ConnectionResetError):
            assert plain.recv(100) == b""
    finally:
        srv.stop()


def test_a_tls_bridge_waits_for_a_slow_client_without_spinning_and_ends_with_a_gone_one(tmp_path: Path) -> None:
    import resource
    import ssl
    import subprocess

    from kvmsandbox.cri.streaming import tls

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([*OPENSSL_SELF_SIGNED, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    listener = socket.create_server(("127.0.0.1", 0))
    client_context = ssl.create_default_context(cafile=str(cert))
    client_context.check_hostname = False
    raw_client = socket.create_connection(listener.getsockname(), timeout=10)
    accepted, _ = listener.accept()
    made: list[socket.socket] = []
    bridging = threading.Thread(target=lambda: made.append(tls.bridge(tls.server_context(cert, key), accepted)))
    bridging.start()
    client = client_context.wrap_socket(raw_client)
    bridging.join(10)
    plain = made[0]
    payload = os.urandom(3_800_000)
    writer = threading.Thread(target=plain.sendall, args=(payload,))
    writer.start()
    time.sleep(0.5)
    before = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(2)  # the client reads nothing: the bridge holds its share and waits
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 0.5
    got = b""
    while len(got) < len(payload):
        got += client.recv(1 << 20)
    writer.join(10)
    assert got == payload
    # The client leaves: the session's end of the pair hears of it.
    client.close()
    plain.settimeout(10)
    assert plain.recv(10) == b""
    plain.close()
    listener.close()

"""The HTTP side of a streaming URL: read the client's request (bounded), find its token, agree on
a subprotocol, and hand the upgraded connection to a SPDY session or a WebSocket.

As Kubernetes' ``httpstream`` does: a SPDY client lists the subprotocols it speaks in
``X-Stream-Protocol-Version`` (its preferred first), a WebSocket client in
``Sec-WebSocket-Protocol``; the server takes the first it also speaks and answers ``101 Switching
Protocols`` with the chosen one. No common version is a 403 that names both lists; an unknown,
used or expired token a 404; anything that is not an upgrade a 400.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs

MAX_REQUEST_BYTES = 16 * 1024
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
REQUEST_TIMEOUT = 10.0
KINDS = ("exec", "attach", "portforward")


class BadRequest(Exception):
    """The request cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    kind: str
    token: str
    headers: dict[str, list[str]]
    rest: bytes
    """What the client sent after the request head (the first frames, when it did not wait)."""
    query: dict[str, list[str]] = field(default_factory=dict)

    def values(self, name: str) -> list[str]:
        """Every value of header ``name``, comma-separated lists split."""
        return [v.strip() for raw in self.headers.get(name.lower(), []) for v in raw.split(",") if v.strip()]


def read_request(sock: socket.socket) -> Request:
    """The request head, at most MAX_REQUEST_BYTES, within REQUEST_TIMEOUT.

    Raises:
        BadRequest: too long, too slow, malformed, or not a streaming path.
    """
    deadline = time.monotonic() + REQUEST_TIMEOUT
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_REQUEST_BYTES:
                raise BadRequest(431, f"request head over {MAX_REQUEST_BYTES} bytes")
            # One deadline for the whole head: a byte now and then does not keep a connection.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(4096)
            if not chunk:
                raise BadRequest(400, "the client closed before its request was complete")
            data += chunk
    except TimeoutError:
        raise BadRequest(408, f"no complete request within {REQUEST_TIMEOUT:.0f} s") from None
    finally:
        sock.settimeout(None)
    head, rest = data.split(b"\r\n\r\n", 1)
    if len(head) > MAX_REQUEST_BYTES:
        raise BadRequest(431, f"request head over {MAX_REQUEST_BYTES} bytes")
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest(400, "a request line that is not METHOD PATH VERSION") from None
    if not version.startswith("HTTP/1."):
        raise BadRequest(505, f"{version} is not HTTP/1.x")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise BadRequest(400, f"a header line without a name: {line[:80]!r}")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    path, _, query = target.partition("?")
    parts = path.strip("/").split("/")
    if len(parts) != 2 or parts[0] not in KINDS or not parts[1]:
        raise BadRequest(404, f"no streaming endpoint at {target[:200]!r}")
    try:
        params = parse_qs(query, max_num_fields=64)
    except ValueError:
        raise BadRequest(400, "more than 64 query parameters") from None
    return Request(method, parts[0], parts[1], headers, rest, params)


def negotiate(request: Request, supported: tuple[str, ...], header: str = "x-stream-protocol-version") -> str:
    """The subprotocol to speak: the client's first that the server supports ("" when the client
    names none, as old clients do).

    Raises:
        BadRequest: 403, when there is no common one.
    """
    offered = request.values(header)
    if not offered:
        return ""
    for proto in offered:
        if proto in supported:
            return proto
    raise BadRequest(
        403,
        f"unable to upgrade: unable to negotiate protocol: client supports {offered[:16]}, "
        f"server supports {list(supported)}",
    )


def is_spdy_upgrade(request: Request) -> bool:
    return "upgrade" in [v.lower() for v in request.values("connection")] and any(
        v.lower() == "spdy/3.1" for v in request.values("upgrade")
    )


def is_websocket_upgrade(request: Request) -> bool:
    return "upgrade" in [v.lower() for v in request.values("connection")] and any(
        v.lower() == "websocket" for v in request.values("upgrade")
    )


def answer_websocket_upgrade(sock: socket.socket, request: Request, protocol: str) -> None:
    """101 Switching Protocols to WebSocket (RFC 6455) with the chosen subprotocol.

    Raises:
        BadRequest: not a version 13 handshake with a key. OSError.
    """
    key = request.values("sec-websocket-key")
    if request.method != "GET" or len(key) != 1 or request.values("sec-websocket-version") != ["13"]:
        raise BadRequest(400, "a WebSocket upgrade is a GET with one Sec-WebSocket-Key and Sec-WebSocket-Version 13")
    digest = hashlib.sha1((key[0] + WEBSOCKET_GUID).encode(), usedforsecurity=False).digest()
    head = (
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Accept: {base64.b64encode(digest).decode()}\r\n"
    )
    if protocol:
        head += f"Sec-WebSocket-Protocol: {protocol}\r\n"
    sock.sendall((head + "\r\n").encode())


def answer_error(sock: socket.socket, error: BadRequest) -> None:
    """A plain HTTP error with the reason as its body; closes nothing. Raises nothing."""
    reasons = {
        400: "Bad Request", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
        431: "Request Header Fields Too Large", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
    }  # fmt: skip
    body = (str(error) + "\n").encode()
    head = (
        f"HTTP/1.1 {error.status} {reasons.get(error.status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        sock.sendall(head.encode() + body)


def answer_spdy_upgrade(sock: socket.socket, protocol: str) -> None:
    """101 Switching Protocols to SPDY/3.1 with the chosen subprotocol. Raises OSError."""
    head = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    if protocol:
        head += f"X-Stream-Protocol-Version: {protocol}\r\n"
    sock.sendall((head + "\r\n").encode())


@dataclass(frozen=True)
class Upgraded:
    """A connection after its 101: the transport ("spdy" | "websocket"), the subprotocol agreed
    on, what the client sent after its request head, and the URL's query."""

    transport: str
    protocol: str
    sock: socket.socket
    first: bytes
    query: dict[str, list[str]]

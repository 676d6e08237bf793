"""Kubernetes' port-forward protocol (``portforward.k8s.io``) on a SPDY session, server side.

For every connection it forwards, the client opens two streams with the same ``requestid`` and
``port`` headers: ``streamtype: error`` and ``streamtype: data``. Once both are there the server
opens the connection in the pod and copies bytes both ways on the data stream; a failure is told
in words on the error stream. Clients that send no ``requestid`` (older ones) are paired by stream
id, as kubelet does: a data stream belongs to the error stream opened just before it. One session
carries any number of such pairs, one after another or at once, until the client leaves.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

from kvmsandbox.cri.streaming.spdy_session import MAX_STREAMS, SpdySession, SpdyStream
from kvmsandbox.cri.streaming.websocket import WsChannel, WsSession

log = logging.getLogger(__name__)

PROTOCOLS = ("portforward.k8s.io",)
# A pair whose second stream does not come within this long is dropped (kubelet's creation timeout).
PAIR_TIMEOUT = 30.0
# The client's bytes are read in pieces of at most this many seconds' wait, to notice the end.
POLL_SECONDS = 0.5
# Forwarded connections one session copies at once (each holds two threads).
MAX_PAIRS = MAX_STREAMS // 2


class Connection(Protocol):
    """A connection to a port in the pod (the sandbox layer's PortStream)."""

    def read(self) -> tuple[bytes, bool]: ...
    def write(self, data: bytes, stop: threading.Event, close_write: bool = False) -> None: ...
    def close(self) -> None: ...


Connect = Callable[[int], Connection]
"""Opens a connection to a port in the pod; raises (KvmSandboxError) with a message for the client."""


class _Pair:
    def __init__(self, port: str) -> None:
        self.port = port
        self.error: SpdyStream | WsChannel | None = None
        self.data: SpdyStream | WsChannel | None = None
        self.created = time.monotonic()


def serve_port_forward(sock: socket.socket, first: bytes, pod: str, connect: Connect) -> None:
    """Serves one port-forward session on an upgraded connection until the client leaves.
    Raises nothing."""
    pairs: dict[str, _Pair] = {}
    lock = threading.Lock()
    active = threading.BoundedSemaphore(MAX_PAIRS)
    stop = threading.Event()

    def on_stream(stream: SpdyStream) -> None:
        kind, port = stream.header("streamtype"), stream.header("port")
        request = stream.header("requestid") or str(stream.stream_id - 2 if kind == "data" else stream.stream_id)
        if kind not in ("error", "data") or not port:
            stream.reset()
            return
        if kind == "error":
            stream.stop_reading()  # the client sends nothing on it
        with lock:
            _drop_stale(pairs)
            pair = pairs.setdefault(request, _Pair(port))
            if getattr(pair, kind) is not None or pair.port != port:
                stream.reset()
                return
            setattr(pair, kind, stream)
            if pair.error is None or pair.data is None:
                return
            del pairs[request]
        if not active.acquire(blocking=False):
            _fail(pair, f"more than {MAX_PAIRS} connections at once in one port-forward session")
            return
        threading.Thread(
            target=_forward_then_release, args=(pair, pod, connect, stop, active), name="port-forward", daemon=True
        ).start()

    session = SpdySession(sock, on_stream, first)
    try:
        session.serve()
    finally:
        stop.set()
        session.close()


def _drop_stale(pairs: dict[str, _Pair]) -> None:
    now = time.monotonic()
    for request, pair in list(pairs.items()):
        if now - pair.created > PAIR_TIMEOUT:
            del pairs[request]
            for stream in (pair.error, pair.data):
                if stream is not None:
                    stream.reset()


def _fail(pair: _Pair, message: str) -> None:
    assert pair.error is not None and pair.data is not None
    with contextlib.suppress(OSError):
        pair.error.write(message.encode())
    pair.error.close()
    pair.data.close()


def _forward_then_release(
    pair: _Pair, pod: str, connect: Connect, stop: threading.Event, active: threading.BoundedSemaphore
) -> None:
    try:
        _forward(pair, pod, connect, stop)
    finally:
        active.release()


def _forward(pair: _Pair, pod: str, connect: Connect, stop: threading.Event) -> None:
    assert pair.error is not None and pair.data is not None
    data = pair.data
    try:
        port = int(pair.port)
        if not 0 < port < 65536:
            raise ValueError(pair.port)
    except ValueError:
        _fail(pair, f"invalid port {pair.port[:20]!r}: must be 1-65535")
        return
    try:
        conn = connect(port)
    except Exception as e:  # the client is told why in words
        log.info("port-forward to %s port %d refused: %s", pod[:12], port, e)
        _fail(pair, f"error forwarding port {port} to pod {pod}: {e}"[:1024])
        return
    done = threading.Event()
    inbound = threading.Thread(target=_client_to_pod, args=(data, conn, done, stop), daemon=True)
    inbound.start()
    try:
        while not (done.is_set() or stop.is_set()):
            chunk, eof = conn.read()
            if chunk:
                data.write(chunk)
            if eof:
                break
    except Exception as e:
        log.info("port-forward to %s port %d ended: %s", pod[:12], port, e)
        with contextlib.suppress(OSError):
            pair.error.write(f"error forwarding port {port} to pod {pod}: {e}"[:1024].encode())
    finally:
        data.stop_reading()  # whatever the client still sends is dropped, not left to block the session
        data.close()
        pair.error.close()
        done.set()
        inbound.join(POLL_SECONDS * 4)
        with contextlib.suppress(Exception):
            conn.close()


def _client_to_pod(data: SpdyStream, conn: Connection, done: threading.Event, stop: threading.Event) -> None:
    """Copies what the client sends into the connection; its end shuts the connection's write side."""
    try:
        while not (done.is_set() or stop.is_set()):
            try:
                chunk = data.read(POLL_SECONDS)
            except TimeoutError:
                continue
            conn.write(chunk, done, close_write=not chunk)
            if not chunk:
                return
    except Exception as e:
        log.info("port-forward: client's bytes not passed on: %s", e)
        done.set()


# SPDY/3.1+portforward.k8s.io: the SPDY protocol tunnelled in binary messages (client-go's
# WebSocket port-forward, crictl --transport websocket); the others: kubelet's channel protocols.
TUNNELLED_SPDY = "SPDY/3.1+portforward.k8s.io"
WS_PROTOCOLS = (
    TUNNELLED_SPDY,
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
)
# Ports one WebSocket session forwards (each is one connection for the session's life).
MAX_WS_PORTS = MAX_PAIRS


def serve_port_forward_ws(
    sock: socket.socket, first: bytes, protocol: str, pod: str, ports: list[int], connect: Connect
) -> None:
    """Serves port-forward on a WebSocket: one connection per port of the URL's query, on
    channels 2i (data) and 2i+1 (error), each opened with the port as two little-endian bytes, as
    kubelet's server does. The session ends when every connection has. Raises nothing."""
    session = WsSession(sock, list(range(2 * len(ports))), base64_framing="base64" in protocol, first=first)
    reader = threading.Thread(target=session.serve, name="port-forward-ws", daemon=True)
    reader.start()
    workers = []
    try:
        for i, port in enumerate(ports):
            data, error = session.channels[2 * i], session.channels[2 * i + 1]
            error.stop_reading()
            prefix = struct.pack("<H", port)
            data.write(prefix)
            error.write(prefix)
            pair = _Pair(str(port))
            pair.data, pair.error = data, error
            worker = threading.Thread(target=_forward, args=(pair, pod, connect, session.closed), daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            while worker.is_alive() and not session.closed.is_set():
                worker.join(1.0)
    except OSError as e:
        log.info("port-forward websocket session ended: %s", e)
    finally:
        session.close()
        reader.join(5)

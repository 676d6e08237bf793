"""Kubernetes' channel protocols on a WebSocket, server side: every message carries one channel's
bytes, its channel number first (``*channel.k8s.io``: a byte, binary messages; ``*base64.channel.k8s.io``:
an ASCII digit then base64, text messages). ``v5.channel.k8s.io`` adds a message to close a
channel (255, then its number): how a client ends its stdin. WebSocket framing is wsproto's, after
the upgrade this server answers itself.

Channels look like SPDY streams to the protocols above them (read, write, close), so exec, attach
and port-forward run unchanged on either transport. Bounds: a message is at most MAX_MESSAGE bytes
(larger ones end the session with 1009), and a channel holds at most CHANNEL_BUFFER bytes its
consumer has not taken before the session stops reading the connection.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import queue
import socket
import threading

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Message, Ping, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from kvmsandbox.cri.streaming.spdy_session import peer_gone

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
CHANNEL_BUFFER = 1 << 20
CHUNK = 32 * 1024
READ_SIZE = 64 * 1024
CLOSE_CHANNEL = 255


class WsChannel:
    """One channel of the session, as a stream: what the client sent on it, what it gets."""

    def __init__(self, session: WsSession, number: int) -> None:
        self.session, self.number = session, number
        self._chunks: queue.Queue[bytes | None] = queue.Queue()
        self._room = threading.Semaphore(CHANNEL_BUFFER // CHUNK)
        self._discarding = False

    def read(self, timeout: float | None = None) -> bytes:
        """The next bytes the client sent; b"" once it closed the channel or left.

        Raises:
            TimeoutError: nothing came within ``timeout``.
        """
        try:
            chunk = self._chunks.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"nothing on channel {self.number} within {timeout} s") from None
        if chunk is None:
            self._chunks.put(None)
            return b""
        self._room.release()
        return chunk

    def write(self, data: bytes) -> None:
        """Raises OSError when the connection is gone."""
        for i in range(0, len(data), CHUNK):
            self.session.send_channel(self.number, data[i : i + CHUNK])

    def close(self) -> None:
        """Nothing to send: a channel ends with the session (kubelet's server does the same)."""

    def stop_reading(self) -> None:
        self._discarding = True
        self._room.release()

    def reset(self) -> None:
        """Drops the channel: nothing more is read from it; its reader sees the end."""
        self.stop_reading()
        self._end()

    def _deliver(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            while not self._room.acquire(timeout=0.5):
                if self._discarding or self.session.closed.is_set():
                    return
                if peer_gone(self.session.sock):
                    self.session.close()
                    return
            if self._discarding:
                self._room.release()
                return
            self._chunks.put(data[i : i + CHUNK])

    def _end(self) -> None:
        self._chunks.put(None)


class WsSession:
    """Serves one upgraded WebSocket connection: ``channels`` are the numbers the protocol uses;
    messages on others are dropped."""

    def __init__(
        self, sock: socket.socket, channels: list[int], base64_framing: bool, first: bytes = b"", raw: bool = False
    ) -> None:
        """``raw``: no channels, every binary message is the next bytes of one stream (channel 0;
        how ``SPDY/3.1+portforward.k8s.io`` tunnels SPDY through a WebSocket)."""
        self._raw = raw
        self._sock = self.sock = sock
        self._ws = Connection(ConnectionType.SERVER)
        self._first = first
        self._base64 = base64_framing
        self._write_lock = threading.Lock()
        self.channels = {n: WsChannel(self, n) for n in channels}
        self.closed = threading.Event()

    def send_channel(self, number: int, data: bytes) -> None:
        """Raises OSError when the connection is gone."""
        message: Message[bytes] | Message[str]
        if self._raw:
            message = BytesMessage(data=data)
        elif self._base64:
            message = TextMessage(data=str(number) + base64.b64encode(data).decode())
        else:
            message = BytesMessage(data=bytes([number]) + data)
        self._send(message)

    def _send(self, event: Event) -> None:
        with self._write_lock:
            try:
                out = self._ws.send(event)
            except LocalProtocolError as e:
                raise OSError(f"websocket closed: {e}") from None
            self._sock.sendall(out)

    def serve(self) -> None:
        """Reads messages until the client closes, breaks the protocol or leaves. Raises nothing."""
        pending: bytearray = bytearray()
        try:
            data = self._first
            while True:
                if data:
                    self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, CloseConnection):
                        with contextlib.suppress(OSError):
                            self._send(event.response())
                        return
                    if isinstance(event, Ping):
                        self._send(event.response())
                    elif isinstance(event, Message):
                        pending += event.data if isinstance(event.data, (bytes, bytearray)) else event.data.encode()
                        if len(pending) > MAX_MESSAGE:
                            log.warning("websocket session ended: a message over %d bytes", MAX_MESSAGE)
                            with contextlib.suppress(OSError):
                                self._send(CloseConnection(code=1009, reason="message too big"))
                            return
                        if event.message_finished:
                            self._dispatch(bytes(pending))
                            pending.clear()
                data = self._sock.recv(READ_SIZE)
                if not data:
                    return
        except RemoteProtocolError as e:
            log.warning("websocket session ended: the client broke the protocol: %s", e)
        except (OSError, LocalProtocolError) as e:
            log.info("websocket session ended: %s", e)
        finally:
            self.close()

    def _dispatch(self, message: bytes) -> None:
        if not message:
            return
        if self._raw:
            self.channels[0]._deliver(message)
            return
        if self._base64:
            number = message[0] - ord("0")
            try:
                payload = base64.b64decode(message[1:], validate=True)
            except (binascii.Error, ValueError):
                log.info("websocket: a channel message that is not base64 was dropped")
                return
        else:
            number, payload = message[0], message[1:]
        if number == CLOSE_CHANNEL and payload:
            channel = self.channels.get(payload[0])
            if channel is not None:
                channel._end()
            return
        channel = self.channels.get(number)
        if channel is not None and payload:
            channel._deliver(payload)

    def close(self, code: int = 1000) -> None:
        """Says goodbye (when it still can), ends every channel and the connection. Idempotent."""
        if not self.closed.is_set():
            with contextlib.suppress(OSError):
                self._send(CloseConnection(code=code))
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self.closed.set()
        for channel in self.channels.values():
            channel._end()


def tunnel(sock: socket.socket, first: bytes) -> tuple[socket.socket, threading.Thread]:
    """The byte stream tunnelled in a WebSocket's binary messages, as the plain end of a socket
    pair (for a protocol that wants a socket, SPDY); the thread that carries it both ways ends
    when either side does. Raises OSError."""
    session = WsSession(sock, [0], base64_framing=False, first=first, raw=True)
    plain, inner = socket.socketpair()

    def to_inner() -> None:
        with contextlib.suppress(OSError):
            while data := session.channels[0].read():
                inner.sendall(data)
        with contextlib.suppress(OSError):
            inner.shutdown(socket.SHUT_WR)

    def to_client() -> None:
        with contextlib.suppress(OSError):
            while data := inner.recv(CHUNK):
                session.send_channel(0, data)
        session.close()
        inner.close()

    for target in (session.serve, to_inner):
        threading.Thread(target=target, name="ws-tunnel", daemon=True).start()
    carrier = threading.Thread(target=to_client, name="ws-tunnel", daemon=True)
    carrier.start()
    return plain, carrier

"""A server-side SPDY/3.1 session on an upgraded connection: the streams a client opens, their data
both ways, and the connection-level frames (PING answered, SETTINGS and WINDOW_UPDATE taken note
of, GOAWAY ends the session).

The peers kubelet and crictl use (Go's spdystream) do no SPDY flow control; neither does this
session. Back-pressure is TCP's: each stream buffers at most STREAM_BUFFER bytes from the client,
and while a consumer is behind, the session stops reading the connection. One reader thread per
session; writes from any thread are serialised (the header compression context is shared).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
from collections.abc import Callable

from kvmsandbox.cri.streaming import spdy

log = logging.getLogger(__name__)

STREAM_BUFFER = 1 << 20
"""Bytes a stream holds from the client before the session stops reading the connection."""
CHUNK = 32 * 1024
"""Largest data frame this side sends."""
MAX_STREAMS = 64
"""Streams one session may have open (remotecommand needs five, port-forward two per port)."""
READ_SIZE = 64 * 1024


class SpdyStream:
    """One stream a client opened: its headers, what it sent (``read``), what it gets (``write``)."""

    def __init__(self, session: SpdySession, stream_id: int, headers: spdy.Headers) -> None:
        self.session, self.stream_id, self.headers = session, stream_id, headers
        self._chunks: queue.Queue[bytes | None] = queue.Queue()
        self._buffered = threading.Semaphore(STREAM_BUFFER // CHUNK)
        self._closed_local = False
        self._closed_remote = False
        self._discarding = False
        self._state_lock = threading.Lock()

    def header(self, name: str) -> str:
        """The first value of header ``name`` ("" when absent)."""
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    def read(self, timeout: float | None = None) -> bytes:
        """The next bytes the client sent; b"" once it has closed its side (or the session ended).

        Raises:
            TimeoutError: nothing came within ``timeout``.
        """
        try:
            chunk = self._chunks.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"nothing on stream {self.stream_id} within {timeout} s") from None
        if chunk is None:
            self._chunks.put(None)  # every later read sees the end too
            return b""
        self._buffered.release()
        return chunk

    def write(self, data: bytes) -> None:
        """Sends ``data`` to the client. Raises OSError when the connection is gone."""
        for i in range(0, len(data), CHUNK):
            self.session.send(spdy.DataFrame(self.stream_id, data[i : i + CHUNK]))

    def close(self) -> None:
        """Ends this side of the stream (the client reads EOF). Idempotent; raises nothing."""
        with self._state_lock:
            if self._closed_local:
                return
            self._closed_local = True
            done = self._closed_remote
        with contextlib.suppress(OSError):
            self.session.send(spdy.DataFrame(self.stream_id, b"", fin=True))
        if done:
            self.session._forget(self.stream_id)  # closed both ways: its place is free again

    def stop_reading(self) -> None:
        """This side wants nothing more from the client: what it sends is dropped (the session
        does not wait on a reader that is gone). Raises nothing."""
        self._discarding = True
        self._buffered.release()

    def reset(self) -> None:
        """Aborts the stream both ways (RST_STREAM CANCEL). Raises nothing."""
        self.stop_reading()
        with self._state_lock:
            self._closed_local = True
        self.session._forget(self.stream_id)
        with contextlib.suppress(OSError):
            self.session.send(spdy.RstStream(self.stream_id, spdy.CANCEL))
        self._end()

    def _deliver(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            # Blocks the session's reader while the consumer is behind (TCP pushes back), but
            # still notices a client that has gone: the session then ends (and its command).
            while not self._buffered.acquire(timeout=0.5):
                if self._discarding or self.session.closed.is_set():
                    return
                if self.session.peer_gone():
                    self.session.close()
                    return
            if self._discarding:
                self._buffered.release()
                return
            self._chunks.put(data[i : i + CHUNK])

    def _end(self) -> None:
        self._chunks.put(None)

    def _remote_fin(self) -> None:
        """The client closed its side: the end for the reader; the place is freed once this side
        has closed too."""
        self._end()
        with self._state_lock:
            self._closed_remote = True
            done = self._closed_local
        if done:
            self.session._forget(self.stream_id)


class SpdySession:
    """Serves one upgraded connection; ``on_stream`` is called (on the reader thread) for every
    stream the client opens, after the session has replied to it."""

    def __init__(self, sock: socket.socket, on_stream: Callable[[SpdyStream], None], first_bytes: bytes = b"") -> None:
        self._sock = sock
        self._on_stream = on_stream
        self._first = first_bytes
        self._encoder = spdy.Encoder()
        self._decoder = spdy.Decoder()
        self._write_lock = threading.Lock()
        self._streams: dict[int, SpdyStream] = {}
        self._last_stream_id = 0
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def send(self, frame: spdy.Frame) -> None:
        """Raises OSError when the connection is gone."""
        with self._write_lock:
            self._sock.sendall(self._encoder.encode(frame))

    def serve(self) -> None:
        """Reads frames until the client leaves, breaks the protocol or says GOAWAY; then every
        stream ends. Raises nothing."""
        try:
            data = self._first
            while True:
                for frame in self._decoder.feed(data):
                    if not self._handle(frame):
                        return
                data = self._sock.recv(READ_SIZE)
                if not data:
                    log.info("spdy session ended: the client closed the connection")
                    return
        except spdy.SpdyError as e:
            log.warning("spdy session ended: the client broke the protocol: %s", e)
            with contextlib.suppress(OSError):
                self.send(spdy.GoAway(0, 1))
        except OSError as e:
            log.info("spdy session ended: %s", e)
        finally:
            self.close()

    def peer_gone(self) -> bool:
        """The client hung up or reset the connection (seen without reading from it)."""
        return peer_gone(self._sock)

    def close(self) -> None:
        """Ends every stream and the connection. Idempotent; raises nothing."""
        # The socket first: a thread blocked sending (holding the write lock) fails at once.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        self.closed.set()
        for stream in streams:
            stream._end()

    def _handle(self, frame: spdy.Frame) -> bool:
        if isinstance(frame, spdy.SynStream):
            self._open(frame)
        elif isinstance(frame, spdy.DataFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                self.send(spdy.RstStream(frame.stream_id, spdy.INVALID_STREAM))
                return True
            if frame.data:
                stream._deliver(frame.data)
            if frame.fin:
                stream._remote_fin()
        elif isinstance(frame, spdy.RstStream):
            with self._lock:
                stream = self._streams.pop(frame.stream_id, None)
            if stream is not None:
                stream._end()
        elif isinstance(frame, spdy.Ping):
            self.send(frame)
        elif isinstance(frame, spdy.GoAway):
            log.info("spdy session ended: the client said GOAWAY")
            return False
        return True  # SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do without flow control

    def _forget(self, stream_id: int) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)

    def _open(self, frame: spdy.SynStream) -> None:
        if frame.stream_id <= self._last_stream_id or frame.stream_id % 2 == 0:
            raise spdy.SpdyError(f"stream {frame.stream_id} opened out of order or with a server's (even) id")
        self._last_stream_id = frame.stream_id
        with self._lock:
            refused = len(self._streams) >= MAX_STREAMS
            if not refused:
                stream = SpdyStream(self, frame.stream_id, frame.headers)
                self._streams[frame.stream_id] = stream
        if refused:
            self.send(spdy.RstStream(frame.stream_id, spdy.REFUSED_STREAM))
            return
        self.send(spdy.SynReply(frame.stream_id, {}))
        if frame.fin:
            stream._remote_fin()
        self._on_stream(stream)


def peer_gone(sock: socket.socket) -> bool:
    """True when the peer has shut its side, hung up or reset ``sock``."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLRDHUP)
        events = poller.poll(0)
    except (OSError, ValueError):
        return True
    return any(mask & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, mask in events)

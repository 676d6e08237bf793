"""Byte streams to the guest on the agent connection: a process's stdin (and its terminal's size)
and port-forward connections.

Each stream has at most one write and one read in flight, each bounded in bytes (CHUNK) and in the
time the agent may wait (WAIT_SECONDS): the guest holds no more than one chunk per stream on its
way in and its own bounded buffer on the way out, so a slow client slows only its stream, and the
requests of every stream interleave on the connection instead of one stream filling it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

from kvmsandbox.agent.client import LONG_POLL_SLACK, AgentClient
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import AgentMisbehaved

# Bytes one call moves at most (the agent's bound on a read, a quarter of a frame).
CHUNK = 1024 * 1024
WAIT_SECONDS = 5.0
RELAY_CONNECT_SECONDS = 5.0
# A call that moved no byte is repeated this long after it was made at the earliest: an agent that
# answers at once with nothing cannot make the host spin.
MIN_CALL_INTERVAL = 0.1


def _unless_spinning(asked: float, moved: int, stop: threading.Event | None = None) -> None:
    if moved == 0:
        delay = MIN_CALL_INTERVAL - (time.monotonic() - asked)
        if delay > 0:
            if stop is None:
                time.sleep(delay)
            else:
                stop.wait(delay)


class StdinWriter:
    """Writes to the stdin of a container's process (``exec_id`` "" for its init process)."""

    def __init__(self, client: AgentClient, container_id: str, exec_id: str) -> None:
        self._client = client
        self._container_id = container_id
        self._exec_id = exec_id

    def _write(self, data: bytes, close: bool) -> int:
        req = pb.WriteStdinRequest(
            container_id=self._container_id,
            exec_id=self._exec_id,
            data=data,
            close=close,
            wait_ms=int(WAIT_SECONDS * 1000),
        )
        written = self._client.call("WriteStdin", req, pb.WriteStdinResponse, WAIT_SECONDS + LONG_POLL_SLACK).written
        if written > len(data):
            raise AgentMisbehaved(f"the agent of {self._client.name} took {written} of {len(data)} stdin bytes")
        return written

    def write(self, data: bytes, stop: threading.Event) -> None:
        """Writes all of ``data`` unless ``stop`` is set first (a process that does not read holds
        the writer, not the agent).

        Raises:
            AgentError: FAILED_PRECONDITION once stdin is closed (the process ended), NOT_FOUND.
            Unavailable, DeadlineExceeded: the agent is gone.
        """
        view = memoryview(data)
        while view and not stop.is_set():
            asked = time.monotonic()
            written = self._write(bytes(view[:CHUNK]), False)
            view = view[written:]
            _unless_spinning(asked, written, stop)

    def close(self) -> None:
        """Closes the process's stdin (EOF; nothing for a terminal). Raises as ``write``."""
        self._write(b"", True)

    def resize(self, width: int, height: int) -> None:
        """Sets the terminal's window size. Raises as ``write``."""
        req = pb.ResizeTerminalRequest(
            container_id=self._container_id, exec_id=self._exec_id, width=width, height=height
        )
        self._client.call("ResizeTerminal", req, pb.ResizeTerminalResponse)


class PortStream:
    """One TCP connection the agent opened to 127.0.0.1:port in the pod."""

    def __init__(self, client: AgentClient, port: int) -> None:
        """Raises AgentError UNAVAILABLE when nothing listens there; Unavailable, DeadlineExceeded."""
        self._client = client
        self.port = port
        self._id = client.call("OpenPort", pb.OpenPortRequest(port=port), pb.OpenPortResponse).connection_id

    def read(self) -> tuple[bytes, bool]:
        """What the server sent next (b"" after WAIT_SECONDS without any) and whether it has
        closed its side. Raises AgentError NOT_FOUND (closed), Unavailable, DeadlineExceeded."""
        asked = time.monotonic()
        req = pb.ReadPortRequest(connection_id=self._id, max_bytes=CHUNK, wait_ms=int(WAIT_SECONDS * 1000))
        resp = self._client.call("ReadPort", req, pb.ReadPortResponse, WAIT_SECONDS + LONG_POLL_SLACK)
        if len(resp.data) > CHUNK:
            raise AgentMisbehaved(f"the agent of {self._client.name} sent {len(resp.data)} bytes for {CHUNK} asked")
        if not resp.eof:
            _unless_spinning(asked, len(resp.data))
        return resp.data, resp.eof

    def write(self, data: bytes, stop: threading.Event, close_write: bool = False) -> None:
        """Sends all of ``data`` (then shuts the write side if ``close_write``) unless ``stop`` is
        set first. Raises AgentError FAILED_PRECONDITION (reset), NOT_FOUND, Unavailable."""
        view = memoryview(data)
        while not stop.is_set():
            chunk = bytes(view[:CHUNK])
            last = len(view) <= CHUNK
            req = pb.WritePortRequest(
                connection_id=self._id, data=chunk, close_write=close_write and last, wait_ms=int(WAIT_SECONDS * 1000)
            )
            asked = time.monotonic()
            written = self._client.call("WritePort", req, pb.WritePortResponse, WAIT_SECONDS + LONG_POLL_SLACK).written
            if written > len(chunk):
                raise AgentMisbehaved(f"the agent of {self._client.name} took {written} of {len(chunk)} bytes")
            view = view[written:]
            if view:
                _unless_spinning(asked, written, stop)
            if not view:
                return

    def close(self) -> None:
        """Closes the connection in the guest. Raises as ``read``."""
        self._client.call("ClosePort", pb.ClosePortRequest(connection_id=self._id), pb.ClosePortResponse)


class RelayStream:
    """A port-forward connection over the pod's network: the agent connects to 127.0.0.1:port in
    the guest and relays (in the guest's kernel) one connection from the host to it, which proves
    itself with a random token. Much faster than PortStream: no byte passes through the agent's
    protocol. What the guest sends is only passed on, never parsed."""

    def __init__(self, client: AgentClient, address: str, port: int) -> None:
        """Raises AgentError (UNAVAILABLE: nothing listens there; UNIMPLEMENTED: an older agent),
        Unavailable, DeadlineExceeded, OSError (the pod's address cannot be reached)."""
        self.port = port
        token = os.urandom(32)
        req = pb.OpenPortRelayRequest(port=port, token=token)
        relay_port = client.call("OpenPortRelay", req, pb.OpenPortRelayResponse).relay_port
        if not 0 < relay_port < 65536:
            raise AgentMisbehaved(f"the agent of {client.name} named relay port {relay_port}")
        self._sock = socket.create_connection((address, relay_port), timeout=RELAY_CONNECT_SECONDS)
        self._sock.settimeout(WAIT_SECONDS)
        # A VM that goes away (pod removed, guest hung) sends no reset: probes find it gone.
        for level, option, value in (
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 15),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
        ):
            self._sock.setsockopt(level, option, value)
        try:
            self._sock.sendall(token)
        except OSError:
            self._sock.close()
            raise

    def read(self) -> tuple[bytes, bool]:
        """What the server sent next (b"" after WAIT_SECONDS without any) and whether it ended."""
        try:
            data = self._sock.recv(CHUNK)
        except TimeoutError:
            return b"", False
        except OSError:
            return b"", True
        return data, not data

    def write(self, data: bytes, stop: threading.Event, close_write: bool = False) -> None:
        """Sends ``data`` unless ``stop`` is set first, then shuts the write side if ``close_write``.
        Raises OSError: the connection failed."""
        view = memoryview(data)
        while view and not stop.is_set():
            try:
                view = view[self._sock.send(view) :]
            except TimeoutError:
                continue
        if close_write and not view:
            self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Resets the connection, so the guest's relay ends whatever the server does."""
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._sock.close()

"""Kubernetes' remotecommand protocol (exec) on a SPDY session, server side.

The client opens one stream per channel, each naming itself in a ``streamtype`` header: ``error``
always, then ``stdin``, ``stdout``, ``stderr`` and ``resize`` as the request asked. The server
waits until every expected stream is there (STREAM_CREATION_TIMEOUT), runs the command with its
output written to the stdout and stderr streams, and ends with the outcome on the error stream:
from ``v4.channel.k8s.io`` on, a JSON ``Status`` (Success, or Failure with reason
NonZeroExitCode and the exit code as a cause), earlier versions a message on failure only.
A client that goes away cancels the command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from kvmsandbox.cri.streaming.spdy_session import SpdySession, SpdyStream
from kvmsandbox.cri.streaming.websocket import WsSession
from kvmsandbox.sandbox.interactive import ProcessIO

log = logging.getLogger(__name__)

PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
STREAM_CREATION_TIMEOUT = 30.0
# Seconds the client gets to close the session after the outcome was sent.
CLOSE_GRACE = 5.0


@dataclass(frozen=True)
class Channels:
    """What the request asked for (the streams the client will open besides ``error``)."""

    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    tty: bool = False

    def expected(self) -> set[str]:
        wanted = {"error"}
        for name, on in (("stdin", self.stdin), ("stdout", self.stdout), ("stderr", self.tty is False and self.stderr)):
            if on:
                wanted.add(name)
        if self.tty:
            wanted.add("resize")
        return wanted


class StreamSink:
    """Where a command's output goes: the client's stdout and stderr streams (the sandbox layer's
    Sink: positions counted here, every byte passed on). With a terminal there is one stream: what
    comes as stderr (the runtime's own messages about the command) goes to stdout."""

    def __init__(self, streams: Mapping[str, Stream], tty: bool = False) -> None:
        self._streams = dict(streams)
        if tty and "stdout" in streams:
            self._streams["stderr"] = streams["stdout"]
        self._tty = tty
        self._sent = {"stdout": 0, "stderr": 0}
        self._gone = False

    def position(self, stream: str) -> tuple[int, int]:
        return self._sent[stream], self._sent[stream]

    def write(self, stream: str, data: bytes) -> None:
        """Passes ``data`` on; once the client is gone, output is dropped (the command is being
        stopped). Raises nothing."""
        target = self._streams.get(stream)
        if target is not None and not self._gone:
            try:
                target.write(data)
            except OSError:
                self._gone = True
        self._sent[stream] += len(data)

    def end(self, stream: str) -> None:
        target = self._streams.get(stream)
        if target is not None and not (self._tty and stream == "stderr"):
            target.close()


class TerminalSizes:
    """The sizes a client sends on its resize stream: JSON objects ``{"Width": w, "Height": h}``
    one after another, however the stream cuts them. A stream that is not that ends the sizes."""

    MAX_PENDING = 4096

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._pending = ""
        self._decoder = json.JSONDecoder()
        self._over = False

    def next_size(self, timeout: float) -> tuple[int, int] | None:
        """Raises TimeoutError when no whole size came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._over:
            while (parsed := self._parse()) is not None:
                if parsed != (0, 0):
                    return parsed
            data = self._stream.read(max(0.0, deadline - time.monotonic()))
            if not data:
                self._over = True
                break
            self._pending += data.decode(errors="replace")
            if len(self._pending) > self.MAX_PENDING:
                log.warning("terminal resize stream ignored: %d bytes without a size", len(self._pending))
                self._over = True
        return None

    def _parse(self) -> tuple[int, int] | None:
        """The next size in what is pending; (0, 0) for a value that is not one (skipped); None
        when no whole value is pending."""
        text = self._pending.lstrip()
        if not text:
            return None
        try:
            obj, end = self._decoder.raw_decode(text)
        except json.JSONDecodeError:
            return None  # incomplete (or garbage: it will exceed MAX_PENDING)
        except (RecursionError, ValueError):
            log.warning("terminal resize stream ignored: nested beyond what a size is")
            self._over = True
            return None
        self._pending = text[end:]
        if not isinstance(obj, dict):
            return 0, 0
        width, height = obj.get("Width"), obj.get("Height")
        if not (isinstance(width, int) and isinstance(height, int) and 0 < width < 1 << 16 and 0 < height < 1 << 16):
            log.warning("terminal size ignored: %.100r", obj)
            return 0, 0
        return width, height


Run = Callable[[ProcessIO], int]
"""Runs the command with its output to the sink until it exits (its exit code) or ``cancelled`` is
set (then it is killed and its code, or -1, returned)."""


class Stream(Protocol):
    """A channel of the session: a SPDY stream or a WebSocket channel."""

    def read(self, timeout: float | None = None) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def stop_reading(self) -> None: ...


def serve_exec(sock: socket.socket, first: bytes, protocol: str, channels: Channels, run: Run) -> None:
    """Serves one exec or attach session on a connection upgraded to SPDY; returns when it is
    over. Raises nothing."""
    streams: dict[str, SpdyStream] = {}
    complete = threading.Event()
    expected = channels.expected()

    def on_stream(stream: SpdyStream) -> None:
        kind = stream.header("streamtype")
        if kind not in expected or kind in streams:
            stream.reset()
            return
        if kind not in ("stdin", "resize"):
            stream.stop_reading()  # nothing is read from error, stdout or stderr
        streams[kind] = stream
        if expected <= streams.keys():
            complete.set()

    session = SpdySession(sock, on_stream, first)
    reader = threading.Thread(target=session.serve, name="exec-session", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STREAM_CREATION_TIMEOUT
        while not complete.wait(0.1) and not session.closed.is_set() and time.monotonic() < deadline:
            pass
        if not complete.is_set() or session.closed.is_set():
            log.info("exec session ended before its streams were open: %s", sorted(streams))
            return
        log.info("exec session streams open: %s", sorted(streams))
        _run_session(dict(streams), session.closed, protocol, channels, run)
    finally:
        session.close()
        reader.join(CLOSE_GRACE)


# The channels of the WebSocket protocols, by number.
WS_CHANNELS = {"stdin": 0, "stdout": 1, "stderr": 2, "error": 3, "resize": 4}
WS_PROTOCOLS = (
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
)


def serve_exec_ws(sock: socket.socket, first: bytes, protocol: str, channels: Channels, run: Run) -> None:
    """Serves one exec or attach session on a connection upgraded to WebSocket (every channel
    is there from the start). Raises nothing."""
    wanted = channels.expected()
    session = WsSession(sock, [WS_CHANNELS[name] for name in wanted], base64_framing="base64" in protocol, first=first)
    for name in wanted - {"stdin", "resize"}:
        session.channels[WS_CHANNELS[name]].stop_reading()
    reader = threading.Thread(target=session.serve, name="exec-session-ws", daemon=True)
    reader.start()
    try:
        streams: dict[str, Stream] = {name: session.channels[WS_CHANNELS[name]] for name in wanted}
        _run_session(streams, session.closed, protocol, channels, run)
    finally:
        session.close()
        reader.join(CLOSE_GRACE)


def _run_session(
    streams: dict[str, Stream], closed: threading.Event, protocol: str, channels: Channels, run: Run
) -> None:
    try:
        io = ProcessIO(
            StreamSink(streams, channels.tty),
            closed,
            stdin=streams.get("stdin"),
            sizes=TerminalSizes(streams["resize"]) if "resize" in streams else None,
            tty=channels.tty,
        )
        # The session's end (the client gone) cancels the command.
        code = run(io)
        log.info("exec session command ended code=%d client_gone=%s", code, closed.is_set())
    except Exception as e:  # the outcome is the client's to see, not a traceback's
        log.warning("exec failed: %s", e)
        with contextlib.suppress(OSError):
            _failure(streams["error"], protocol, str(e)[:1024])
    else:
        with contextlib.suppress(OSError):
            _outcome(streams["error"], protocol, code)
    for stream in streams.values():
        stream.close()
    closed.wait(CLOSE_GRACE)


def _outcome(error: Stream, protocol: str, code: int) -> None:
    if code == 0:
        if protocol.startswith("v4") or protocol.startswith("v5"):
            error.write(json.dumps({"metadata": {}, "status": "Success"}).encode())
        return
    if not (protocol.startswith("v4") or protocol.startswith("v5")):
        error.write(f"command terminated with non-zero exit code: {code}".encode())
        return
    status = {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }
    error.write(json.dumps(status).encode())


def _failure(error: Stream, protocol: str, message: str) -> None:
    if protocol.startswith("v4") or protocol.startswith("v5"):
        error.write(json.dumps({"metadata": {}, "status": "Failure", "message": message}).encode())
    else:
        error.write(message.encode())

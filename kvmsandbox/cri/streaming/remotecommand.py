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
from collections.abc import Callable
from dataclasses import dataclass

from kvmsandbox.cri.streaming.spdy_session import SpdySession, SpdyStream

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
    Sink: positions counted here, every byte passed on)."""

    def __init__(self, streams: dict[str, SpdyStream]) -> None:
        self._streams = streams
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
        if target is not None:
            target.close()


Run = Callable[[StreamSink, threading.Event], int]
"""Runs the command with its output to the sink until it exits (its exit code) or the event is set
(then it is killed and its code, or -1, returned)."""


def serve_exec(sock: socket.socket, first: bytes, protocol: str, channels: Channels, run: Run) -> None:
    """Serves one exec session on an upgraded connection; returns when it is over. Raises nothing."""
    streams: dict[str, SpdyStream] = {}
    complete = threading.Event()
    expected = channels.expected()

    def on_stream(stream: SpdyStream) -> None:
        kind = stream.header("streamtype")
        if kind not in expected or kind in streams:
            stream.reset()
            return
        if kind != "stdin":
            stream.stop_reading()  # nothing is read from error, stdout, stderr (resize: to come)
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
        try:
            # The session's end (the client gone) cancels the command.
            code = run(StreamSink(streams), session.closed)
            log.info("exec session command ended code=%d client_gone=%s", code, session.closed.is_set())
        except Exception as e:  # the outcome is the client's to see, not a traceback's
            log.warning("exec failed: %s", e)
            with contextlib.suppress(OSError):
                _failure(streams["error"], protocol, str(e)[:1024])
        else:
            with contextlib.suppress(OSError):
                _outcome(streams["error"], protocol, code)
        for stream in streams.values():
            stream.close()
        session.closed.wait(CLOSE_GRACE)
    finally:
        session.close()
        reader.join(CLOSE_GRACE)


def _outcome(error: SpdyStream, protocol: str, code: int) -> None:
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


def _failure(error: SpdyStream, protocol: str, message: str) -> None:
    if protocol.startswith("v4") or protocol.startswith("v5"):
        error.write(json.dumps({"metadata": {}, "status": "Failure", "message": message}).encode())
    else:
        error.write(message.encode())

"""Container output on the host, in the CRI log format kubelet reads:
``<RFC3339Nano timestamp> <stdout|stderr> <P|F> <line>``, F for a full line, P for a piece of a
line longer than the buffer (or cut by the end of the stream)."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path
from typing import BinaryIO

# containerd splits lines longer than this into P pieces.
MAX_LINE_BYTES = 16 * 1024


def timestamp(ns: int | None = None) -> str:
    """RFC 3339 with nanoseconds in UTC, as kubelet writes and parses."""
    now = datetime.datetime.now(datetime.UTC) if ns is None else datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond * 1000:09d}Z"


class CriLogWriter:
    """Appends both streams of one container to a log file; thread-safe; reopenable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._partial: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - lives as long as the writer

    def _emit(self, stream: str, tag: str, line: bytes) -> None:
        self._file.write(f"{timestamp()} {stream} {tag} ".encode() + line + b"\n")

    def _emit_pieces(self, stream: str, line: bytes, complete: bool) -> bytes:
        """Writes ``line`` in pieces of at most MAX_LINE_BYTES; returns what is left unwritten
        (the unfinished tail of an incomplete line)."""
        while len(line) > MAX_LINE_BYTES:
            self._emit(stream, "P", line[:MAX_LINE_BYTES])
            line = line[MAX_LINE_BYTES:]
        if complete:
            self._emit(stream, "F", line)
            return b""
        return line

    def write(self, stream: str, data: bytes) -> None:
        """Adds output of ``stream`` ("stdout" or "stderr"); complete lines are written at once."""
        with self._lock:
            *lines, rest = (self._partial[stream] + data).split(b"\n")
            for line in lines:
                self._emit_pieces(stream, line, complete=True)
            self._partial[stream] = self._emit_pieces(stream, rest, complete=False)
            self._file.flush()

    def close_stream(self, stream: str) -> None:
        """The stream ended: a last line without a newline is written as a full line."""
        with self._lock:
            if self._partial[stream]:
                self._emit(stream, "F", self._partial[stream])
                self._partial[stream] = b""
                self._file.flush()

    def reopen(self) -> None:
        """Starts a new file at the same path (after log rotation moved the old one away)."""
        with self._lock:
            self._file.close()
            self._file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        with self._lock:
            self._file.close()


def parse_cri_log(text: str) -> list[tuple[str, str, str]]:
    """(stream, tag, content) for every line of a CRI log file."""
    out = []
    for line in text.splitlines():
        _, stream, tag, *content = line.split(" ", 3)
        out.append((stream, tag, content[0] if content else ""))
    return out

"""Container output on the host, in the CRI log format kubelet reads:
``<RFC3339Nano timestamp> <stdout|stderr> <P|F> <line>``, F for a full line, P for a piece of a
line longer than the buffer (or cut by the end of the stream)."""

from __future__ import annotations

import contextlib
import datetime
import os
import struct
import threading
from pathlib import Path

# containerd splits lines longer than this into P pieces.
MAX_LINE_BYTES = 16 * 1024


def timestamp(ns: int | None = None) -> str:
    """RFC 3339 with nanoseconds in UTC, as kubelet writes and parses."""
    now = datetime.datetime.now(datetime.UTC) if ns is None else datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond * 1000:09d}Z"


STREAMS = ("stdout", "stderr")
_STATE = struct.Struct("<8sQQQQQQQ")
_STATE_MAGIC = b"kslogpo1"


class LogPositions:
    """Where a container's output stands in its log, kept in a small file beside the pod's state so
    that a runtime killed at any instant resumes reading the guest's output exactly where its log
    ends: no line lost, none repeated.

    Before each append the file records the log's inode, its size before and after the append, and
    each stream's stored position before and after. On open, a log that reached the "after" size
    got the append (take the new positions); one between the two sizes got part of it (cut it back
    and take the old positions). One record, rewritten in place by a single pwrite.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.path = path

    def recover(self, log_fd: int) -> dict[str, int]:
        """The stored position of each stream, after cutting a half-made append off the log."""
        raw = os.pread(self._fd, _STATE.size, 0)
        if len(raw) != _STATE.size or raw[:8] != _STATE_MAGIC:
            return dict.fromkeys(STREAMS, 0)
        _, ino, before, after, out_old, out_new, err_old, err_new = _STATE.unpack(raw)
        st = os.fstat(log_fd)
        if st.st_ino == ino and before <= st.st_size < after:
            os.ftruncate(log_fd, before)
            return {"stdout": out_old, "stderr": err_old}
        return {"stdout": out_new, "stderr": err_new}

    def record(self, log_fd: int, size: int, added: int, old: dict[str, int], new: dict[str, int]) -> None:
        ino = os.fstat(log_fd).st_ino
        values = (old["stdout"], new["stdout"], old["stderr"], new["stderr"])
        os.pwrite(self._fd, _STATE.pack(_STATE_MAGIC, ino, size, size + added, *values), 0)

    def close(self) -> None:
        os.close(self._fd)


class LogClosed(Exception):
    """The writer was closed (its container is being removed): nothing more is written."""


class CriLogWriter:
    """Appends both streams of one container to a log file; thread-safe; reopenable.

    Tracks each stream's position (bytes of output received) and the stored position (received
    minus the unfinished line it holds in memory). With ``positions``, every append is recorded
    there first (see LogPositions) and the writer starts from the stored positions.
    """

    def __init__(self, path: Path, positions: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._partial: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._open()
        self._positions: LogPositions | None = None
        try:
            self._positions = LogPositions(positions) if positions is not None else None
            self._stored = self._positions.recover(self._fd) if self._positions else dict.fromkeys(STREAMS, 0)
        except BaseException:
            self.close()
            raise
        self._received = dict(self._stored)

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(self.path, flags, 0o640)

    def position(self, stream: str) -> tuple[int, int]:
        """(position of the next byte to read, position up to which output is stored)."""
        with self._lock:
            return self._received[stream], self._stored[stream]

    @staticmethod
    def _prefix(stream: str, tag: str, ts: str) -> bytes:
        return f"{ts} {stream} {tag} ".encode()

    def _pieces(self, stream: str, lines: list[bytes], rest: bytes, complete: bool) -> tuple[bytes, bytes]:
        """The log entries for ``lines`` (complete) and ``rest`` (complete only if ``complete``),
        lines longer than MAX_LINE_BYTES in pieces; and what is left of ``rest`` (the unfinished
        tail of an incomplete line). One timestamp for all: they arrived together."""
        ts = timestamp()
        full = self._prefix(stream, "F", ts)
        if complete:
            lines, rest = [*lines, rest], b""
        out = bytearray()
        for line in lines:
            out += self._split(stream, ts, line) if len(line) > MAX_LINE_BYTES else full + line + b"\n"
        if len(rest) > MAX_LINE_BYTES:
            cut = len(rest) - len(rest) % MAX_LINE_BYTES or len(rest) - MAX_LINE_BYTES
            out += self._split(stream, ts, rest[:cut], last="P")
            rest = rest[cut:]
        return bytes(out), rest

    def _split(self, stream: str, ts: str, line: bytes, last: str = "F") -> bytes:
        piece = self._prefix(stream, "P", ts)
        chunks = [line[i : i + MAX_LINE_BYTES] for i in range(0, len(line), MAX_LINE_BYTES)]
        out = b"".join(piece + c + b"\n" for c in chunks[:-1])
        return out + self._prefix(stream, last, ts) + chunks[-1] + b"\n"

    def _append(self, block: bytes | bytearray, received: dict[str, int], partial: dict[str, bytes]) -> None:
        """Appends ``block``, then takes ``received`` and ``partial`` as the new state. On an error
        (disk full) the log is cut back and nothing changes: the same output is read again.

        Raises:
            OSError: the log could not be written.
        """
        if self._fd < 0:
            raise LogClosed(f"{self.path} is closed")
        stored = {s: received[s] - len(partial[s]) for s in STREAMS}
        size = os.fstat(self._fd).st_size
        if self._positions is not None and (block or stored != self._stored):
            self._positions.record(self._fd, size, len(block), self._stored, stored)
        view = memoryview(block)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise
        self._stored, self._received, self._partial = stored, received, partial

    def write(self, stream: str, data: bytes) -> None:
        """Adds output of ``stream`` ("stdout" or "stderr"); complete lines are written at once."""
        with self._lock:
            *lines, rest = (self._partial[stream] + data).split(b"\n")
            block, rest = self._pieces(stream, lines, rest, complete=False)
            partial = {**self._partial, stream: rest}
            received = {**self._received, stream: self._received[stream] + len(data)}
            self._append(block, received, partial)

    def close_stream(self, stream: str) -> None:
        """The stream ended: a last line without a newline is written as a full line."""
        with self._lock:
            if self._partial[stream]:
                block, _ = self._pieces(stream, [], self._partial[stream], complete=True)
                self._append(block, self._received, {**self._partial, stream: b""})

    def reopen(self) -> None:
        """Starts a new file at the same path (after log rotation moved the old one away)."""
        with self._lock:
            if self._fd < 0:
                return
            fd = self._open()  # on failure the old file stays in use
            os.close(self._fd)
            self._fd = fd
            if self._positions is not None:
                size = os.fstat(self._fd).st_size
                self._positions.record(self._fd, size, 0, self._stored, self._stored)

    def close(self, forget_positions: bool = False) -> None:
        """Closes the log; ``forget_positions`` removes the positions file too (the container is
        gone)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._positions is not None:
                self._positions.close()
                if forget_positions:
                    self._positions.path.unlink(missing_ok=True)
                self._positions = None


def parse_cri_log(text: str) -> list[tuple[str, str, str]]:
    """(stream, tag, content) for every line of a CRI log file. Lines end at "\n" only: a
    terminal's "\r" is part of the content."""
    out = []
    for line in text.split("\n"):
        if not line:
            continue
        _, stream, tag, *content = line.split(" ", 3)
        out.append((stream, tag, content[0] if content else ""))
    return out

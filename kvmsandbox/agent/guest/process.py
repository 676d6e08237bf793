"""Processes the agent starts: spawning without ``fork`` in a threaded program, their output
buffered for the host to read, and their exit status delivered by the reaper."""

from __future__ import annotations

import os
import select
import selectors
import threading
import time
from collections.abc import Sequence

from kvmsandbox.agent.guest.reaper import Reaper, exit_code_of

# A container blocks on write once this much of its output waits unread, as it would on a pipe.
STREAM_BUFFER_LIMIT = 1024 * 1024
READ_CHUNK = 64 * 1024


class OutputBuffer:
    """Drains one pipe in a thread and keeps what it read until the host says it has stored it.

    Positions count bytes since the stream began. The host reads from a position and acknowledges
    the one up to which its log is written; only acknowledged bytes are forgotten, so a host that
    crashes between reading and writing reads the same bytes again from its stored position.
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self._cond = threading.Condition()
        self._data = bytearray()
        self._base = 0  # position of _data[0]
        self._delivered = 0  # end of what the host was given
        self._eof = False
        self._closed = False
        threading.Thread(target=self._pump, name=name, daemon=True).start()

    def _pump(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: len(self._data) < STREAM_BUFFER_LIMIT or self._closed)
                    if self._closed:
                        return
                try:
                    chunk = os.read(self._fd, READ_CHUNK)
                except BlockingIOError:
                    # A terminal's master shares its O_NONBLOCK with the writer's copy.
                    poller = select.poll()
                    poller.register(self._fd, select.POLLIN)
                    poller.poll(1000)
                    continue
                with self._cond:
                    if not chunk:
                        self._eof = True
                        self._cond.notify_all()
                        return
                    self._data += chunk
                    self._cond.notify_all()
        except OSError:
            with self._cond:
                self._eof = True
                self._cond.notify_all()
        finally:
            os.close(self._fd)

    def read(self, offset: int, acknowledged: int, max_bytes: int, wait: float) -> tuple[bytes, int, bool]:
        """Forgets what is before ``acknowledged``; returns up to ``max_bytes`` bytes from
        ``offset`` (waiting at most ``wait`` seconds for some), their position, and whether the
        stream has ended with nothing after them."""
        with self._cond:
            end = self._base + len(self._data)
            drop = min(acknowledged, end) - self._base
            if drop > 0:
                del self._data[:drop]
                self._base += drop
                self._cond.notify_all()
            start = min(max(offset, self._base), self._base + len(self._data))
            self._cond.wait_for(lambda: self._base + len(self._data) > start or self._eof or self._closed, timeout=wait)
            i = start - self._base
            out = bytes(self._data[i : i + max_bytes])
            self._delivered = max(self._delivered, start + len(out))
            ended = (self._eof or self._closed) and start + len(out) >= self._base + len(self._data)
            return out, start, ended

    def finished(self) -> bool:
        """The stream ended and the host was given all of it."""
        with self._cond:
            return (self._eof or self._closed) and self._delivered >= self._base + len(self._data)

    def wait_eof(self, timeout: float) -> bool:
        """Waits until the writer closed the pipe; True if it did."""
        with self._cond:
            return self._cond.wait_for(lambda: self._eof or self._closed, timeout=timeout)

    def close(self) -> None:
        """Stops draining; the next read reports the end of the stream."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ExitInfo:
    """How a process ended. (Plain classes in the agent: dataclasses cost 0.2 s of boot under TCG.)"""

    __slots__ = ("exit_code", "finished_at_ns", "signal")

    def __init__(self, exit_code: int, signal: int, finished_at_ns: int) -> None:
        self.exit_code = exit_code
        self.signal = signal
        self.finished_at_ns = finished_at_ns


class Exit:
    """The exit of one pid, filled in by the reaper, awaited by anyone."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.info: ExitInfo | None = None

    def set_status(self, status: int) -> None:
        code, sig = exit_code_of(status)
        self.info = ExitInfo(code, sig, time.time_ns())
        self._event.set()

    def wait(self, timeout: float | None) -> ExitInfo | None:
        self._event.wait(timeout)
        return self.info


def spawn(
    reaper: Reaper,
    argv: Sequence[str],
    *,
    stdout: int,
    stderr: int,
    stdin: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, Exit]:
    """Starts ``argv`` with the given stdout/stderr fds and stdin (None: /dev/null).

    Raises:
        OSError: the program could not be started (not found, not executable).
    """
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            env if env is not None else dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull if stdin is None else stdin, 0),
                (os.POSIX_SPAWN_DUP2, stdout, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
            ],
        )
    finally:
        os.close(devnull)
    exit_ = Exit()
    reaper.spawned()
    reaper.watch(pid, exit_.set_status)
    return pid, exit_


class CommandResult:
    __slots__ = ("exit_code", "stderr", "stdout")

    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


def run_command(reaper: Reaper, argv: Sequence[str], timeout: float = 30.0) -> CommandResult:
    """Runs a short helper command (crun, mount helpers) to completion and collects its output.

    Raises:
        OSError: the program could not be started.
        TimeoutError: it did not finish in ``timeout`` seconds (it is killed).
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid, exit_ = spawn(reaper, argv, stdout=out_w, stderr=err_w)
    except OSError:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for fd in chunks:
            sel.register(fd, selectors.EVENT_READ)
        open_fds = len(chunks)
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, READ_CHUNK)
                if data:
                    chunks[key.fd].append(data)
                else:
                    sel.unregister(key.fd)
                    open_fds -= 1
    for fd in chunks:
        os.close(fd)
    info = exit_.wait(max(0.0, deadline - time.monotonic()))
    if info is None:
        os.kill(pid, 9)
        exit_.wait(5)
        raise TimeoutError(f"{argv[0]} did not finish within {timeout:.0f}s")
    return CommandResult(
        info.exit_code,
        b"".join(chunks[out_r]).decode(errors="replace"),
        b"".join(chunks[err_r]).decode(errors="replace"),
    )

"""Containers' and processes' output streams from the agent: pumps that copy stdout and stderr to a
sink until both end, the sinks (CRI log file, in-memory collector), and the registry of the pumps
and log writers of every container."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Protocol

from kvmsandbox.agent.client import AgentClient
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import AgentError, DeadlineExceeded, Unavailable
from kvmsandbox.sandbox.logs import CriLogWriter, LogClosed

log = logging.getLogger(__name__)

STDIO_POLL_SECONDS = 5.0
# An agent that answers a long poll at once with nothing is asked again after this long at the
# earliest: no guest can make a pump spin.
MIN_POLL_INTERVAL = 0.1
# A log that cannot be written (a full disk) is tried again this often.
STORE_RETRY_SECONDS = 1.0
# ExecSync keeps this much of each stream (both together stay within gRPC's 16 MiB message
# limit, which the kubelet uses too); the rest is read and dropped so the command does not block
# on a full pipe.
EXEC_OUTPUT_LIMIT = 8 * 1024 * 1024 - 64 * 1024
# Output an attached client may have waiting before it is cut off.
TAP_LIMIT = 4 * 1024 * 1024


class Sink(Protocol):
    """Where a pump puts one process's output."""

    def position(self, stream: str) -> tuple[int, int]:
        """(position to read ``stream`` from, position up to which it is stored for good)."""

    def write(self, stream: str, data: bytes) -> None:
        """Output of ``stream`` ("stdout" | "stderr") continuing at its position.

        Raises:
            OSError: it could not be stored; nothing changed and the same output comes again.
        """

    def end(self, stream: str) -> None:
        """``stream`` has ended."""


def _aligned(asked: int, answer: pb.ReadStdioResponse) -> bytes:
    """The part of the guest's answer that continues at ``asked``. Agents that predate positions
    hand out each byte once, so their answers always continue. A position after the one asked is
    not something an agent can have (it forgets only what the host acknowledged): it is dropped."""
    if not answer.positioned or answer.offset == asked:
        return answer.data
    if answer.offset > asked:
        return b""
    return answer.data[asked - answer.offset :]


class Pace:
    """Keeps a stream's copying at most ``bytes_per_second`` on average, a second's worth in a burst."""

    def __init__(self, bytes_per_second: float) -> None:
        self.rate = bytes_per_second
        self._credit = bytes_per_second
        self._at = time.monotonic()

    def spent(self, n: int, stop: threading.Event) -> None:
        """Counts ``n`` bytes copied; waits (or until ``stop``) while the stream is over its rate."""
        now = time.monotonic()
        self._credit = min(self.rate, self._credit + (now - self._at) * self.rate) - n
        self._at = now
        if self._credit < 0:
            stop.wait(-self._credit / self.rate)


class OutputPump:
    """Copies a process's stdout and stderr from the agent to a sink until both end."""

    def __init__(
        self, client: AgentClient, container_id: str, exec_id: str, sink: Sink, bytes_per_second: float
    ) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._pump,
                args=(client, container_id, exec_id, stream, name, sink, self._stop, Pace(bytes_per_second)),
                name=f"stdio-{container_id[:12]}-{name}",
                daemon=True,
            )
            for stream, name in ((pb.STDOUT, "stdout"), (pb.STDERR, "stderr"))
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(
        client: AgentClient,
        container_id: str,
        exec_id: str,
        stream: pb.Stream.ValueType,
        name: str,
        sink: Sink,
        stop: threading.Event,
        pace: Pace,
    ) -> None:
        failures = 0
        ended = False
        while not stop.is_set():
            asked = time.monotonic()
            at = sink.position(name)
            try:
                answer = client.read_stdio(container_id, exec_id, stream, STDIO_POLL_SECONDS, at)
                data = _aligned(at[0], answer)
                if data:
                    sink.write(name, data)
                    pace.spent(len(data), stop)
            except OSError as e:
                # The log cannot be written (a full disk): the guest keeps the output (its
                # container blocks once enough waits), so try again for as long as it takes.
                log.warning("output of %s %s cannot be stored: %s", container_id[:12], name, e)
                stop.wait(STORE_RETRY_SECONDS)
                continue
            except LogClosed:
                return  # the container is being removed
            except (AgentError, Unavailable, DeadlineExceeded) as e:
                # NotFound: the container is gone. Anything else: retry a few times, the agent
                # may be reconnecting.
                failures += 1
                ended = isinstance(e, AgentError) and e.grpc_code == "NOT_FOUND"
                if ended or failures > 20:
                    log.warning("output of %s %s: giving up: %s", container_id[:12], name, e)
                    break
                stop.wait(0.2)
                continue
            failures = 0
            if answer.eof:
                ended = True
                break
            if not data:
                stop.wait(max(0.0, MIN_POLL_INTERVAL - (time.monotonic() - asked)))
        if ended:
            # An unfinished last line is written as a whole one. When the pump is only stopped
            # (the runtime shuts down) it stays unwritten: the next runtime reads it again whole.
            with contextlib.suppress(OSError, LogClosed):
                sink.end(name)

    def stop(self) -> None:
        """Stops copying after the current read (the runtime shuts down; the guest keeps the rest)."""
        self._stop.set()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)


class OutputCollector:
    """Sink that keeps output in memory (ExecSync), at most ``limit`` bytes of each stream."""

    def __init__(self, limit: int = EXEC_OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.data: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.dropped: dict[str, int] = {"stdout": 0, "stderr": 0}

    def position(self, stream: str) -> tuple[int, int]:
        received = len(self.data[stream]) + self.dropped[stream]
        return received, received

    def write(self, stream: str, data: bytes) -> None:
        kept = self.data[stream]
        room = max(0, self.limit - len(kept))
        kept += data[:room]
        self.dropped[stream] += max(0, len(data) - room)

    def end(self, stream: str) -> None:
        pass


class LogSink:
    """Sink that writes CRI-format log lines, and hands what it wrote to the taps of attached
    clients (after the log took it: output read again after a failed write is not repeated)."""

    def __init__(self, writer: CriLogWriter) -> None:
        self.writer = writer
        self._lock = threading.Lock()
        self._taps: set[Tap] = set()
        self._ended: set[str] = set()

    def position(self, stream: str) -> tuple[int, int]:
        return self.writer.position(stream)

    def write(self, stream: str, data: bytes) -> None:
        self.writer.write(stream, data)
        with self._lock:
            taps = list(self._taps)
        for tap in taps:
            tap.put(stream, data)

    def end(self, stream: str) -> None:
        self.writer.close_stream(stream)
        with self._lock:
            self._ended.add(stream)
            taps = list(self._taps)
        for tap in taps:
            tap.end(stream)

    def tap(self, streams: tuple[str, ...]) -> Tap:
        with self._lock:
            tap = Tap(streams, self._ended)
            self._taps.add(tap)
            return tap

    def untap(self, tap: Tap) -> None:
        with self._lock:
            self._taps.discard(tap)

    def finish(self) -> None:
        """No more output will come (the container is removed, the runtime stops): every tap ends."""
        with self._lock:
            taps = list(self._taps)
        for tap in taps:
            for stream in tap.streams:
                tap.end(stream)


class Tap:
    """A copy of a container's output from now on, for one attached client. Bounded: a client
    TAP_LIMIT bytes behind is cut off (the log and the container do not wait for it)."""

    def __init__(self, streams: tuple[str, ...], ended: set[str]) -> None:
        self.streams = streams
        self._cond = threading.Condition()
        self._chunks: deque[tuple[str, bytes]] = deque()
        self._size = 0
        self._ended = set(ended) & set(streams)
        self.overflowed = False

    def put(self, stream: str, data: bytes) -> None:
        with self._cond:
            if self.overflowed or stream not in self.streams:
                return
            if self._size + len(data) > TAP_LIMIT:
                self.overflowed = True
            else:
                self._chunks.append((stream, data))
                self._size += len(data)
            self._cond.notify_all()

    def end(self, stream: str) -> None:
        with self._cond:
            self._ended.add(stream)
            self._cond.notify_all()

    def get(self, timeout: float) -> tuple[str, bytes] | None:
        """The next piece of output; None once every stream has ended and all was taken, or the
        client fell too far behind.

        Raises:
            TimeoutError: nothing within ``timeout``.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks or self._over(), timeout):
                raise TimeoutError
            if self.overflowed or not self._chunks:
                return None
            stream, data = self._chunks.popleft()
            self._size -= len(data)
            return stream, data

    def _over(self) -> bool:
        return self.overflowed or self._ended >= set(self.streams)


Key = tuple[str, str]
"""(sandbox id, container id)"""


class StdioRegistry:
    """The log writer and the output pump of every container whose output the runtime copies."""

    def __init__(self, bytes_per_second: float) -> None:
        self.bytes_per_second = bytes_per_second
        self._lock = threading.Lock()
        self._pumps: dict[Key, OutputPump] = {}
        self._writers: dict[Key, CriLogWriter] = {}
        self._sinks: dict[Key, LogSink] = {}

    def add_writer(self, key: Key, writer: CriLogWriter) -> None:
        with self._lock:
            self._writers[key] = writer

    def writer(self, key: Key) -> CriLogWriter | None:
        with self._lock:
            return self._writers.get(key)

    def pump(self, key: Key) -> OutputPump | None:
        with self._lock:
            return self._pumps.get(key)

    def start_log_pump(self, key: Key, log_path: Path, positions: Path, client: AgentClient) -> None:
        """Copies the container's output to its log (opened here, with its positions file,
        unless a writer exists); no-op while a pump runs already.

        Raises:
            OSError: the log could not be opened.
        """
        with self._lock:
            if key in self._pumps:
                return
            writer = self._writers.get(key) or CriLogWriter(log_path, positions)
            self._writers[key] = writer
            self._sinks[key] = sink = LogSink(writer)
            self._pumps[key] = OutputPump(client, key[1], "", sink, self.bytes_per_second)

    def sink(self, key: Key) -> LogSink | None:
        """Where the container's output goes while the runtime copies it."""
        with self._lock:
            return self._sinks.get(key)

    def release(self, key: Key, join_timeout: float) -> None:
        """Waits up to ``join_timeout`` for the pump to end and closes the log."""
        with self._lock:
            pump = self._pumps.pop(key, None)
            writer = self._writers.pop(key, None)
            sink = self._sinks.pop(key, None)
        if pump is not None and not pump.join(join_timeout):
            pump.stop()  # it ends at its next read: the closed writer takes nothing more
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.finish()

    def release_sandbox(self, sandbox_id: str, join_timeout: float) -> None:
        """``release`` for every container of the sandbox (its agent connection is gone by now)."""
        with self._lock:
            keys = {k for k in (*self._pumps, *self._writers) if k[0] == sandbox_id}
        deadline = time.monotonic() + join_timeout
        for key in keys:
            self.release(key, max(0.0, deadline - time.monotonic()))

    def stop_all(self) -> list[OutputPump]:
        """Tells every pump to stop after its current read; returns them (for ``close_all``)."""
        with self._lock:
            pumps = list(self._pumps.values())
        for pump in pumps:
            pump.stop()
        return pumps

    def close_all(self, join_timeout: float) -> None:
        """Waits for every pump to end and closes every log."""
        with self._lock:
            pumps = list(self._pumps.values())
            writers = list(self._writers.values())
            sinks = list(self._sinks.values())
            self._pumps.clear()
            self._writers.clear()
            self._sinks.clear()
        for sink in sinks:
            sink.finish()
        deadline = time.monotonic() + join_timeout
        for pump in pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        for w in writers:
            w.close()

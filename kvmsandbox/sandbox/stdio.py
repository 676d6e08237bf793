"""Containers' and processes' output streams from the agent: pumps that copy stdout and stderr to a
sink until both end, the sinks (CRI log file, in-memory collector), and the registry of the pumps
and log writers of every container."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
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
    """Sink that writes CRI-format log lines."""

    def __init__(self, writer: CriLogWriter) -> None:
        self.writer = writer

    def position(self, stream: str) -> tuple[int, int]:
        return self.writer.position(stream)

    def write(self, stream: str, data: bytes) -> None:
        self.writer.write(stream, data)

    def end(self, stream: str) -> None:
        self.writer.close_stream(stream)


Key = tuple[str, str]
"""(sandbox id, container id)"""


class StdioRegistry:
    """The log writer and the output pump of every container whose output the runtime copies."""

    def __init__(self, bytes_per_second: float) -> None:
        self.bytes_per_second = bytes_per_second
        self._lock = threading.Lock()
        self._pumps: dict[Key, OutputPump] = {}
        self._writers: dict[Key, CriLogWriter] = {}

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
            self._pumps[key] = OutputPump(client, key[1], "", LogSink(writer), self.bytes_per_second)

    def release(self, key: Key, join_timeout: float) -> None:
        """Waits up to ``join_timeout`` for the pump to end and closes the log."""
        with self._lock:
            pump = self._pumps.pop(key, None)
            writer = self._writers.pop(key, None)
        if pump is not None and not pump.join(join_timeout):
            pump.stop()  # it ends at its next read: the closed writer takes nothing more
        if writer is not None:
            writer.close()

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
            self._pumps.clear()
            self._writers.clear()
        deadline = time.monotonic() + join_timeout
        for pump in pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        for w in writers:
            w.close()

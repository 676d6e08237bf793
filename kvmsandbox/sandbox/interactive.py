"""What a client brings to an interactive process besides reading its output: bytes for its stdin
and sizes for its terminal, copied to the guest by one thread each while the process runs; and
attaching a client to a running container's streams."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kvmsandbox.agent.streams import StdinWriter
from kvmsandbox.errors import FailedPrecondition, KvmSandboxError
from kvmsandbox.sandbox.containers import find
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.states import ContainerState
from kvmsandbox.sandbox.stdio import Sink

log = logging.getLogger(__name__)

# How long a copier waits on its client before it checks whether the process is over.
POLL_SECONDS = 0.5


class ByteSource(Protocol):
    def read(self, timeout: float | None = None) -> bytes:
        """The next bytes; b"" once the client has closed its side.

        Raises:
            TimeoutError: nothing came within ``timeout``.
        """

    def stop_reading(self) -> None:
        """Nothing more will be read: what the client sends is dropped (it does not pile up)."""


class SizeSource(Protocol):
    def next_size(self, timeout: float) -> tuple[int, int] | None:
        """The next terminal size (width, height) the client sent; None once it sends no more.

        Raises:
            TimeoutError: none came within ``timeout``.
        """


@dataclass
class ProcessIO:
    """A client's side of one process: where its output goes, and what comes in."""

    sink: Sink
    cancelled: threading.Event
    stdin: ByteSource | None = None
    sizes: SizeSource | None = None
    tty: bool = False
    # Closing the client's stdin closes the process's (False: attach to a container that outlives it).
    close_stdin: bool = True
    threads: list[threading.Thread] = field(default_factory=list)


def first_size(io: ProcessIO, wait: float) -> tuple[int, int]:
    """The terminal size the client sends first, if it comes within ``wait`` ((0, 0) if not);
    it is applied again once the process runs."""
    if not io.tty or io.sizes is None:
        return 0, 0
    with contextlib.suppress(TimeoutError):
        size = io.sizes.next_size(wait)
        if size is not None:
            io.sizes = _Replay(size, io.sizes)
            return size
    return 0, 0


class _Replay:
    def __init__(self, size: tuple[int, int], rest: SizeSource) -> None:
        self._first: tuple[int, int] | None = size
        self._rest = rest

    def next_size(self, timeout: float) -> tuple[int, int] | None:
        first, self._first = self._first, None
        return first if first is not None else self._rest.next_size(timeout)


def start_copiers(io: ProcessIO, writer: StdinWriter, done: threading.Event, name: str) -> None:
    """Starts the threads copying the client's stdin and terminal sizes to the process until the
    client stops sending, the process is ``done``, or the guest refuses (its stdin closed)."""
    if io.stdin is not None:
        _start(io, name + "-stdin", lambda: _copy_stdin(io.stdin, writer, done, io.close_stdin and not io.tty))
    if io.tty and io.sizes is not None:
        _start(io, name + "-resize", lambda: _copy_sizes(io.sizes, writer, done))


def join_copiers(io: ProcessIO, timeout: float) -> None:
    for t in io.threads:
        t.join(timeout)


def _start(io: ProcessIO, name: str, target: Callable[[], None]) -> None:
    t = threading.Thread(target=target, name=name, daemon=True)
    io.threads.append(t)
    t.start()


def _copy_stdin(source: ByteSource | None, writer: StdinWriter, done: threading.Event, close: bool) -> None:
    assert source is not None
    try:
        while not done.is_set():
            try:
                data = source.read(POLL_SECONDS)
            except TimeoutError:
                continue
            if not data:
                if close:
                    writer.close()
                return
            writer.write(data, done)
    except KvmSandboxError as e:
        log.info("stdin copy ended: %s", e)


def _copy_sizes(sizes: SizeSource | None, writer: StdinWriter, done: threading.Event) -> None:
    assert sizes is not None
    try:
        while not done.is_set():
            try:
                size = sizes.next_size(POLL_SECONDS)
            except TimeoutError:
                continue
            if size is None:
                return
            writer.resize(*size)
    except KvmSandboxError as e:
        log.info("terminal resize copy ended: %s", e)


def attach(ctx: SandboxContext, sandbox_id: str, container_id: str, io: ProcessIO) -> int:
    """Attaches a client to a running container: its output from now on to ``io.sink``, the
    client's stdin (when the container has one) and terminal sizes in, until the container's
    output ends, the client leaves (``io.cancelled``) or falls TAP_LIMIT bytes behind. Returns 0.

    Raises:
        NotFound. FailedPrecondition: the container does not run, or its output is not copied.
    """
    record = ctx.store.get(sandbox_id)
    c = find(record, container_id)
    client = ctx.ready_client(record)
    if c.state is not ContainerState.RUNNING:
        raise FailedPrecondition(f"container {container_id} is {c.state.value}, not running")
    sink = ctx.stdio.sink((sandbox_id, container_id))
    if sink is None:
        raise FailedPrecondition(f"the output of container {container_id} is not being copied: cannot attach")
    if not c.stdin and io.stdin is not None:
        io.stdin.stop_reading()  # the container has no stdin: what the client types is dropped
        io.stdin = None
    io.tty = c.tty
    io.close_stdin = c.stdin_once
    ended = threading.Event()
    writer = StdinWriter(client, container_id, "")
    tap = sink.tap(("stdout",) if c.tty else ("stdout", "stderr"))
    try:
        start_copiers(io, writer, ended, f"attach-{container_id[:12]}")
        while not io.cancelled.is_set():
            try:
                piece = tap.get(POLL_SECONDS)
            except TimeoutError:
                continue
            if piece is None:
                if tap.overflowed:
                    log.warning("attach to %s cut off: the client fell behind", container_id[:12])
                break
            io.sink.write(*piece)
    finally:
        ended.set()
        sink.untap(tap)
        join_copiers(io, POLL_SECONDS * 4 + 10)
        if c.stdin and c.stdin_once and not c.tty:
            with contextlib.suppress(KvmSandboxError):
                writer.close()  # the first attach is over: so is the container's stdin
    return 0

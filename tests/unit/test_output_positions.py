"""Output positions between the agent and the host: the agent keeps what the host has not stored,
the host reads from where its log ends; together no byte is lost or repeated across a crash."""

from __future__ import annotations

import os
import threading
import time

from kvmsandbox.agent.guest.process import STREAM_BUFFER_LIMIT, OutputBuffer
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.sandbox.stdio import _aligned


def _buffer_with(data: bytes, close: bool = True) -> tuple[OutputBuffer, int]:
    r, w = os.pipe()
    buf = OutputBuffer(r, "test")
    os.write(w, data)
    if close:
        os.close(w)
        assert buf.wait_eof(5)
    return buf, w


def test_output_is_kept_until_acknowledged_and_read_again_from_any_position() -> None:
    buf, _ = _buffer_with(b"hello world")
    assert buf.read(0, 0, 5, 1) == (b"hello", 0, False)
    # A host that crashed before storing "hello" asks again from 0: same bytes.
    assert buf.read(0, 0, 5, 1) == (b"hello", 0, False)
    # Stored up to 5: forgotten; the rest follows, and the end.
    assert buf.read(5, 5, 100, 1) == (b" world", 5, True)
    # Asking before what was acknowledged gives the first byte still kept, with its position.
    assert buf.read(0, 0, 100, 1) == (b" world", 5, True)
    assert buf.finished()


def test_unacknowledged_output_blocks_the_writer_as_a_full_pipe_does() -> None:
    r, w = os.pipe()
    buf = OutputBuffer(r, "test")
    os.set_blocking(w, False)
    chunk = b"x" * 65536
    written = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            written += os.write(w, chunk)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                written += os.write(w, chunk)
            except BlockingIOError:
                break
    # Kept: the buffer's bound plus what the pipe itself holds, never more.
    assert STREAM_BUFFER_LIMIT <= written <= STREAM_BUFFER_LIMIT + 2 * 1024 * 1024
    # Reading without acknowledging frees nothing; acknowledging does.
    data, at, _ = buf.read(0, 0, 1 << 20, 1)
    assert at == 0 and len(data) > 0
    done = threading.Event()

    def writer() -> None:
        os.set_blocking(w, True)
        os.write(w, chunk)
        done.set()

    threading.Thread(target=writer, daemon=True).start()
    assert not done.wait(0.5)
    buf.read(len(data), len(data), 1, 1)
    assert done.wait(5)
    os.close(w)
    buf.close()


def test_the_host_takes_only_what_continues_where_it_asked() -> None:
    def answer(data: bytes, offset: int, positioned: bool = True) -> pb.ReadStdioResponse:
        return pb.ReadStdioResponse(data=data, offset=offset, positioned=positioned)

    assert _aligned(10, answer(b"abc", 10)) == b"abc"
    assert _aligned(10, answer(b"abcdef", 7)) == b"def"  # overlap: not repeated
    assert _aligned(10, answer(b"abc", 5)) == b""  # all of it stored already
    assert _aligned(10, answer(b"abc", 12)) == b""  # a gap no honest agent makes
    assert _aligned(10, answer(b"abc", 2**64 - 1)) == b""
    assert _aligned(10, answer(b"abc", 0, positioned=False)) == b"abc"  # an agent without positions

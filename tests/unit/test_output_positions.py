"""Output positions between the agent and the host: the agent keeps what the host has not stored,
the host reads from where its log ends; together no byte is lost or repeated across a crash."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from kvmsandbox.agent.guest.process import STREAM_BUFFER_LIMIT, OutputBuffer
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.sandbox.logs import CriLogWriter, parse_cri_log
from kvmsandbox.sandbox.stdio import LogSink, OutputPump, _aligned


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


class ScriptedAgent:
    """Answers ReadStdio like the agent does, from a fixed stdout, recording what it was asked."""

    def __init__(self, stdout: bytes, eof: bool = False, chunk: int = 6) -> None:
        self.stdout, self.eof, self.chunk = stdout, eof, chunk
        self.asked: list[tuple[int, int]] = []

    def read_stdio(
        self, container_id: str, exec_id: str, stream: int, wait: float, at: tuple[int, int] = (0, 0)
    ) -> pb.ReadStdioResponse:
        if stream != pb.STDOUT:
            time.sleep(0.05)
            return pb.ReadStdioResponse(eof=True, positioned=True)
        self.asked.append(at)
        data = self.stdout[at[0] : at[0] + self.chunk]
        if not data and not self.eof:
            time.sleep(0.02)
        ended = self.eof and at[0] + len(data) >= len(self.stdout)
        return pb.ReadStdioResponse(data=data, offset=at[0], eof=ended, positioned=True)


def _pump(agent: object, writer: CriLogWriter, rate: float = 1e12) -> OutputPump:
    return OutputPump(agent, "c" * 64, "", LogSink(writer), rate)  # type: ignore[arg-type]


def test_the_pump_acknowledges_only_what_is_in_the_log(tmp_path: Path) -> None:
    agent = ScriptedAgent(b"abc\ndef\nghi\njk", eof=True)
    writer = CriLogWriter(tmp_path / "c.log", tmp_path / "c.pos")
    assert _pump(agent, writer).join(5)
    # "abc\nde": "abc\n" stored, "de" held; "f\nghi\n": all stored; then "jk" and the end.
    assert agent.asked == [(0, 0), (6, 4), (12, 12)]
    writer.close()
    assert [c for _, _, c in parse_cri_log((tmp_path / "c.log").read_text())] == ["abc", "def", "ghi", "jk"]


def test_a_stopped_pump_leaves_an_unfinished_line_for_the_next_runtime(tmp_path: Path) -> None:
    agent = ScriptedAgent(b"hello wor")
    writer = CriLogWriter(tmp_path / "c.log", tmp_path / "c.pos")
    pump = _pump(agent, writer)
    time.sleep(0.5)
    pump.stop()
    assert pump.join(5)
    writer.close()
    assert (tmp_path / "c.log").read_text() == ""
    agent.stdout = b"hello world\n"
    again = CriLogWriter(tmp_path / "c.log", tmp_path / "c.pos")
    agent.eof = True
    assert _pump(agent, again).join(5)
    again.close()
    assert parse_cri_log((tmp_path / "c.log").read_text()) == [("stdout", "F", "hello world")]


def test_a_closed_log_ends_the_pump_even_if_the_guest_keeps_sending(tmp_path: Path) -> None:
    agent = ScriptedAgent(b"x\n" * 10_000_000, chunk=2)
    writer = CriLogWriter(tmp_path / "c.log", tmp_path / "c.pos")
    pump = _pump(agent, writer)
    time.sleep(0.2)
    writer.close()
    assert pump.join(2)


def test_answers_from_a_position_never_asked_are_dropped_without_spinning(tmp_path: Path) -> None:
    class Liar(ScriptedAgent):
        def read_stdio(
            self, container_id: str, exec_id: str, stream: int, wait: float, at: tuple[int, int] = (0, 0)
        ) -> pb.ReadStdioResponse:
            if stream == pb.STDOUT:
                self.asked.append(at)
                return pb.ReadStdioResponse(data=b"boo\n", offset=2**64 - 1, positioned=True)
            return super().read_stdio(container_id, exec_id, stream, wait, at)

    agent = Liar(b"")
    writer = CriLogWriter(tmp_path / "c.log", tmp_path / "c.pos")
    pump = _pump(agent, writer)
    time.sleep(1.0)
    pump.stop()
    assert pump.join(2)
    writer.close()
    assert 5 <= len(agent.asked) <= 12  # one ask per MIN_POLL_INTERVAL, not a spin
    assert set(agent.asked) == {(0, 0)} and (tmp_path / "c.log").read_text() == ""


def test_a_chatty_stream_is_copied_no_faster_than_its_rate(tmp_path: Path) -> None:
    agent = ScriptedAgent(b"y" * 999 + b"\n", chunk=1000)
    agent.stdout *= 10_000
    writer = CriLogWriter(tmp_path / "c.log", tmp_path / "c.pos")
    pump = _pump(agent, writer, rate=100_000)
    time.sleep(1.5)
    pump.stop()
    assert pump.join(3)
    copied = writer.position("stdout")[0]
    writer.close()
    # A second's burst, then 100 kB/s.
    assert 150_000 <= copied <= 300_000

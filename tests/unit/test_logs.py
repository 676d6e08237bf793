import os
import re
import signal
from pathlib import Path

import pytest

from kvmsandbox.sandbox.logs import MAX_LINE_BYTES, CriLogWriter, parse_cri_log

CRI_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) (P|F) ")


def test_lines_are_written_in_cri_format_with_partial_lines_joined(tmp_path: Path) -> None:
    w = CriLogWriter(tmp_path / "c.log")
    w.write("stdout", b"hel")
    w.write("stderr", b"oops\n")
    w.write("stdout", b"lo\nwor")
    w.close_stream("stdout")
    w.close()
    text = (tmp_path / "c.log").read_text()
    assert all(CRI_LINE.match(line) for line in text.splitlines())
    assert parse_cri_log(text) == [("stderr", "F", "oops"), ("stdout", "F", "hello"), ("stdout", "F", "wor")]


def test_overlong_lines_are_split_into_partial_pieces(tmp_path: Path) -> None:
    w = CriLogWriter(tmp_path / "c.log")
    w.write("stdout", b"x" * (MAX_LINE_BYTES * 2 + 5) + b"\n")
    w.close()
    entries = parse_cri_log((tmp_path / "c.log").read_text())
    assert [tag for _, tag, _ in entries] == ["P", "P", "F"]
    assert "".join(content for _, _, content in entries) == "x" * (MAX_LINE_BYTES * 2 + 5)


def test_reopen_starts_a_new_file_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    w = CriLogWriter(path)
    w.write("stdout", b"one\n")
    path.rename(tmp_path / "c.log.1")
    w.reopen()
    w.write("stdout", b"two\n")
    w.close()
    assert parse_cri_log(path.read_text()) == [("stdout", "F", "two")]


# -- positions: a runtime killed at any instant resumes exactly where its log ends ---------------


def test_positions_count_only_what_is_in_the_log(tmp_path: Path) -> None:
    log, positions = tmp_path / "c.log", tmp_path / "c.pos"
    w = CriLogWriter(log, positions)
    w.write("stdout", b"one\ntw")
    w.write("stderr", b"err\n")
    assert w.position("stdout") == (6, 4)  # "tw" is held in memory, not stored
    assert w.position("stderr") == (4, 4)
    w.close()  # as a kill would: the unfinished line is not written
    again = CriLogWriter(log, positions)
    assert again.position("stdout") == (4, 4) and again.position("stderr") == (4, 4)
    again.write("stdout", b"two\n")  # the guest sends "tw" again, and more
    again.close()
    assert parse_cri_log(log.read_text()) == [("stdout", "F", "one"), ("stderr", "F", "err"), ("stdout", "F", "two")]


def _interrupted_append(log: Path, positions: Path, cut: int | None) -> None:
    """Does what ``write`` does up to the moment of a kill: the positions record of an append, then
    ``cut`` bytes of it in the log (all of it when None)."""
    w = CriLogWriter(log, positions)
    w.write("stdout", b"first\n")
    block = b"2026-11-30T00:00:00.000000000Z stdout F second\n"
    size = log.stat().st_size
    assert w._positions is not None
    w._positions.record(w._fd, size, len(block), {"stdout": 6, "stderr": 0}, {"stdout": 13, "stderr": 0})
    with open(log, "ab") as f:
        f.write(block if cut is None else block[:cut])
    w.close()


def test_a_kill_in_the_middle_of_an_append_cuts_it_and_reads_it_again(tmp_path: Path) -> None:
    log, positions = tmp_path / "c.log", tmp_path / "c.pos"
    _interrupted_append(log, positions, cut=10)
    w = CriLogWriter(log, positions)
    assert w.position("stdout") == (6, 6)
    assert parse_cri_log(log.read_text()) == [("stdout", "F", "first")]
    w.close()


def test_a_kill_after_an_append_keeps_it_and_does_not_repeat_it(tmp_path: Path) -> None:
    log, positions = tmp_path / "c.log", tmp_path / "c.pos"
    _interrupted_append(log, positions, cut=None)
    w = CriLogWriter(log, positions)
    assert w.position("stdout") == (13, 13)
    w.close()
    assert [c for _, _, c in parse_cri_log(log.read_text())] == ["first", "second"]


def test_a_kill_before_an_append_reads_it_again(tmp_path: Path) -> None:
    log, positions = tmp_path / "c.log", tmp_path / "c.pos"
    _interrupted_append(log, positions, cut=0)
    w = CriLogWriter(log, positions)
    assert w.position("stdout") == (6, 6)
    w.close()


def test_a_rotated_log_keeps_positions_and_a_damaged_positions_file_starts_over(tmp_path: Path) -> None:
    log, positions = tmp_path / "c.log", tmp_path / "c.pos"
    w = CriLogWriter(log, positions)
    w.write("stdout", b"one\n")
    log.rename(tmp_path / "c.log.1")
    w.reopen()
    w.write("stdout", b"two\n")
    w.close()
    assert CriLogWriter(log, positions).position("stdout") == (8, 8)
    positions.write_bytes(b"\xff" * 1000)
    assert CriLogWriter(log, positions).position("stdout") == (0, 0)


def test_a_failed_write_changes_nothing_and_the_same_output_comes_again(tmp_path: Path) -> None:
    log, positions = tmp_path / "c.log", tmp_path / "c.pos"
    w = CriLogWriter(log, positions)
    w.write("stdout", b"one\n")
    full = log.read_bytes()
    w._fd, real = os.open(os.devnull, os.O_RDONLY), w._fd
    with pytest.raises(OSError):
        w.write("stdout", b"two\n")
    os.close(w._fd)
    w._fd = real
    assert w.position("stdout") == (4, 4) and log.read_bytes() == full
    w.write("stdout", b"two\n")
    w.close()
    assert [c for _, _, c in parse_cri_log(log.read_text())] == ["one", "two"]


def test_a_kill_inside_the_real_append_leaves_the_log_whole_and_positions_that_match(tmp_path: Path) -> None:
    """The writer's own append, killed with SIGKILL after half of its block reached the log."""
    log, positions = tmp_path / "c.log", tmp_path / "c.pos"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies by SIGKILL
        w = CriLogWriter(log, positions)
        w.write("stdout", b"first\n")
        real_write = os.write

        def half_then_die(fd: int, data: bytes) -> int:
            real_write(fd, bytes(data[: len(data) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
            return 0

        os.write = half_then_die  # type: ignore[assignment]
        w.write("stdout", b"second\nthird\n")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert "second" not in log.read_text() or not log.read_text().endswith("\n")  # really torn
    w = CriLogWriter(log, positions)
    assert w.position("stdout") == (6, 6)
    w.write("stdout", b"second\nthird\n")
    w.close()
    assert [c for _, _, c in parse_cri_log(log.read_text())] == ["first", "second", "third"]


def test_a_reopen_that_fails_keeps_writing_to_the_open_log(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    w = CriLogWriter(logs / "c.log")
    w.write("stdout", b"one\n")
    logs.rename(tmp_path / "moved")  # the log's directory is gone: the new file cannot be made
    with pytest.raises(FileNotFoundError):
        w.reopen()
    w.write("stdout", b"two\n")
    w.close()
    assert [c for _, _, c in parse_cri_log((tmp_path / "moved" / "c.log").read_text())] == ["one", "two"]


def test_a_writer_that_cannot_start_leaves_no_descriptor_open(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    (tmp_path / "pos").mkdir()  # a directory where the positions file should be
    for _ in range(10):
        with pytest.raises(OSError):
            CriLogWriter(tmp_path / "c.log", tmp_path / "pos")
    assert len(os.listdir("/proc/self/fd")) == before

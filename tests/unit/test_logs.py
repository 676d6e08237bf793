import re
from pathlib import Path

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

"""Bounding a VM's console log, on real files: the trim keeps the newest output, leaves links and
special files alone, and loses nothing a concurrent O_APPEND writer adds while it collapses."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvmsandbox.config import ConfigError, parse_config
from kvmsandbox.cri.server import _housekeeping
from kvmsandbox.host import console_log
from kvmsandbox.sandbox.console import ConsoleSweeper, console_tail

SHM = Path("/dev/shm")


def numbered(first: int, count: int) -> bytes:
    return b"".join(b"line %08d\n" % i for i in range(first, first + count))  # 14 bytes a line


def test_a_file_under_the_cap_is_not_opened_nor_changed(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"x" * 1000)
    assert console_log.trim(log, 1000, 500) == 0
    assert log.read_bytes() == b"x" * 1000
    assert console_log.trim(tmp_path / "missing", 1000, 500) == 0


def test_a_file_past_the_cap_keeps_its_newest_bytes_by_collapsing_whole_blocks(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    data = numbered(0, 200_000)  # 2.8 MB
    log.write_bytes(data)
    block = os.stat(log).st_blksize
    dropped = console_log.trim(log, 1 << 20, 1 << 19)
    assert dropped % block == 0 and dropped >= len(data) - (1 << 19)
    assert log.read_bytes() == data[dropped:]
    assert os.stat(log).st_size <= 1 << 19
    # Blocks really went (a collapse, not a hole): the file occupies about what it holds.
    assert os.stat(log).st_blocks * 512 <= (1 << 19) + 2 * block


def test_where_the_filesystem_cannot_collapse_the_tail_is_copied(tmp_path: Path) -> None:
    base = SHM if SHM.is_dir() else tmp_path  # tmpfs has no COLLAPSE_RANGE
    log = base / f"console-{os.getpid()}.log"
    try:
        data = numbered(0, 100_000)
        log.write_bytes(data)
        assert console_log.trim(log, 1 << 20, 300_000) == len(data) - 300_000
        assert log.read_bytes() == data[-300_000:]
    finally:
        log.unlink(missing_ok=True)


def test_a_cap_below_two_blocks_still_holds(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    data = numbered(0, 1000)
    log.write_bytes(data)
    console_log.trim(log, 1000, 500)
    assert log.read_bytes() == data[-500:]


def test_a_huge_sparse_log_is_trimmed_and_tailed_without_reading_it(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    with open(log, "wb") as f:
        f.seek(64 << 30)
        f.write(b"the end\n")
    t0 = time.monotonic()
    assert console_log.read_tail(log, 8) == b"the end\n"
    console_log.trim(log, 1 << 20, 1 << 19)
    assert time.monotonic() - t0 < 2
    assert os.stat(log).st_size <= 1 << 19
    assert log.read_bytes().endswith(b"the end\n")


def test_a_symlink_in_place_of_the_log_is_left_alone_with_its_target(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"p" * 100_000)
    log = tmp_path / "console.log"
    log.symlink_to(target)
    with pytest.raises(OSError) as e:
        console_log.trim(log, 1000, 500)
    assert e.value.errno == errno.ELOOP
    with pytest.raises(OSError):
        console_log.read_tail(log, 10)
    assert target.read_bytes() == b"p" * 100_000 and log.is_symlink()


def test_special_files_and_second_names_are_never_opened_for_real(tmp_path: Path) -> None:
    fifo = tmp_path / "console.log"
    os.mkfifo(fifo)  # opening it to read would block without a writer
    for path in (fifo, tmp_path):
        with pytest.raises(OSError) as e:
            console_log.trim(path, 1, 0)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            console_log.read_tail(path, 10)
    other = tmp_path / "other"
    other.write_bytes(b"o" * 100_000)
    linked = tmp_path / "linked.log"
    os.link(other, linked)
    with pytest.raises(OSError) as e:
        console_log.trim(linked, 1000, 500)
    assert e.value.errno == errno.EINVAL
    assert other.read_bytes() == b"o" * 100_000


def test_appends_during_collapses_are_kept_whole_and_in_order(tmp_path: Path) -> None:
    """QEMU appends (O_APPEND) while the sweep trims: the log is always a gapless run of the
    writer's latest lines."""
    log = tmp_path / "console.log"
    log.touch()
    done = threading.Event()
    written = [0]

    def writer() -> None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        try:
            while not done.is_set():
                os.write(fd, numbered(written[0], 100))
                written[0] += 100
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 1.5
        trims = 0
        while time.monotonic() < deadline:
            trims += console_log.trim(log, 64 << 10, 32 << 10) > 0
    finally:
        done.set()
        thread.join()
    assert trims > 5
    data = log.read_bytes()
    last = written[0] - 1
    # The first line may be cut mid-way by a block boundary; every whole line after it follows on.
    lines = data.split(b"\n")[1:-1]
    assert lines[-1] == b"line %08d" % last
    first = last - len(lines) + 1
    assert b"\n".join(lines) + b"\n" == numbered(first, len(lines))


def fake_ctx(state: Path, ids: list[str], cap: int) -> Any:
    config = SimpleNamespace(sandbox=SimpleNamespace(console_log_max_bytes=cap))
    return SimpleNamespace(
        config=config,
        store=SimpleNamespace(ids=lambda: list(ids), get=lambda sandbox_id: SimpleNamespace(vm_name=sandbox_id)),
        console_log=lambda sandbox_id: state / sandbox_id / "console.log",
        # The libvirt backend's QEMU stderr log, which QEMU appends to at will.
        hypervisor=SimpleNamespace(vmm_logs=lambda vm: (state / vm / "qemu.log",)),
    )


def test_the_sweep_bounds_every_sandbox_and_warns_once_about_one_it_cannot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = ["big", "small", "near", "linked", "gone"]
    for sandbox_id in ids[:4]:
        (tmp_path / sandbox_id).mkdir()
    (tmp_path / "big" / "console.log").write_bytes(numbered(0, 100_000))
    (tmp_path / "small" / "console.log").write_bytes(b"booted\n")
    (tmp_path / "small" / "qemu.log").write_bytes(numbered(0, 100_000))
    # Past 3/4 of the cap: cut already, to leave room for what comes before the next sweep.
    (tmp_path / "near" / "console.log").write_bytes(b"n" * (200 << 10))
    (tmp_path / "linked" / "console.log").symlink_to(tmp_path / "big" / "console.log")
    sweeper = ConsoleSweeper(fake_ctx(tmp_path, ids, 256 << 10))
    with caplog.at_level(logging.WARNING):
        first = sweeper.sweep()
        second = sweeper.sweep()
    assert (first.checked, first.trimmed) == (5, 3) and second.trimmed == 0
    assert os.stat(tmp_path / "small" / "qemu.log").st_size <= 128 << 10
    assert os.stat(tmp_path / "big" / "console.log").st_size <= 128 << 10
    assert os.stat(tmp_path / "near" / "console.log").st_size <= 128 << 10
    assert (tmp_path / "small" / "console.log").read_bytes() == b"booted\n"
    assert [r.getMessage() for r in caplog.records if "linked" in r.getMessage()] == [
        f"sandbox linked: cannot bound its log {tmp_path}/linked/console.log: "
        f"[Errno 40] it is a symlink: '{tmp_path}/linked/console.log'"
    ]
    ctx = fake_ctx(tmp_path, ids, 256 << 10)
    assert console_tail(ctx, "big", 2) == "line 00099998\nline 00099999"
    assert console_tail(ctx, "linked") == "(no console output)"


def test_the_cap_is_a_config_key() -> None:
    assert parse_config("").sandbox.console_log_max_bytes == 1 << 20
    assert parse_config("sandbox: {console_log_max_bytes: 65536}").sandbox.console_log_max_bytes == 65536
    with pytest.raises(ConfigError, match="console_log_max_bytes"):
        parse_config("sandbox: {console_log_max_bytes: 0}")


def test_the_server_sweeps_on_its_one_housekeeping_thread() -> None:
    calls: list[float] = []
    manager: Any = SimpleNamespace(trim_consoles=lambda: calls.append(time.monotonic()))
    stop = threading.Event()
    thread = threading.Thread(target=_housekeeping, args=(stop, manager))
    thread.start()
    time.sleep(1.3)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and len(calls) >= 2

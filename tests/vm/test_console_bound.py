"""A guest that floods its serial console (as one whose container escaped to root could) keeps a
bounded console log on the host, on both backends (real guests)."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.host import console_log
from kvmsandbox.sandbox.console import SWEEP_SECONDS
from kvmsandbox.sandbox.manager import SandboxManager

pytestmark = pytest.mark.vm

CAP = 64 << 10
FLOOD_LINES = 40_000  # 64 bytes each: 2.5 MiB, forty times the cap
# PID 1 of the guest forks a child that floods /dev/console, then becomes the agent as usual.
FLOOD = f"""
import os
if os.fork() == 0:
    fd = os.open('/dev/console', os.O_WRONLY | os.O_NOCTTY)
    for first in range(0, {FLOOD_LINES}, 64):
        os.write(fd, b''.join(b'flood %08d %s\\n' % (i, b'x' * 48) for i in range(first, first + 64)))
    os.write(fd, b'flood done\\n')
    os._exit(0)
os.execv('/usr/bin/python3', ['/usr/bin/python3', '-S', '-u', '-m', 'kvmsandbox.agent.guest'])
"""
# kvmsandbox.exec splits on commas and the kernel on spaces: the program travels as hex.
FLOOD_ARG = f"kvmsandbox.exec=/usr/bin/python3,-S,-c,exec(bytes.fromhex('{FLOOD.encode().hex()}').decode())"


@pytest.fixture
def capped(manager: SandboxManager, tmp_path: Path) -> Iterator[SandboxManager]:
    """The session's manager (same hypervisor and guest image) with a small console cap."""
    config = manager.config
    config = dataclasses.replace(
        config,
        state_dir=tmp_path / "state",
        sandbox=dataclasses.replace(config.sandbox, console_log_max_bytes=CAP),
    )
    m = SandboxManager(config, manager.hypervisor, manager.image)
    yield m
    for record in m.list_sandboxes():
        m.destroy_sandbox(record.id)
    m.close()


def test_a_guest_flooding_its_console_keeps_a_bounded_log(capped: SandboxManager) -> None:
    record = capped.create_sandbox("flooder", cmdline_extra=(FLOOD_ARG,))
    path = capped.console_log(record.id)
    t0 = time.monotonic()
    dropped = sweeps = 0
    largest = 0
    while b"flood done\r\n" not in console_log.read_tail(path, 4096):
        assert time.monotonic() - t0 < 120, "the guest did not finish its flood"
        if sweeps:  # what the guest adds between two sweeps (the first follows the whole boot)
            largest = max(largest, os.stat(path).st_size)
        result = capped.trim_consoles()
        dropped += result.dropped_bytes
        sweeps += 1
        time.sleep(SWEEP_SECONDS)
    flood_seconds = time.monotonic() - t0
    largest = max(largest, os.stat(path).st_size)
    dropped += capped.trim_consoles().dropped_bytes
    data = path.read_bytes()
    print(
        f"\n{dropped} bytes dropped in {sweeps + 1} sweeps over "
        f"{flood_seconds:.1f}s, at most {largest} bytes before a sweep (cap {CAP})"
    )
    assert len(data) <= CAP and dropped >= FLOOD_LINES * 64 - CAP
    # The newest output is there, whole and in order: QEMU's appends after each collapse landed
    # right behind what stayed (no hole of zeros, nothing written at a stale offset).
    assert b"\0" not in data
    # The guest's tty writes each newline as \r\n; the agent may log after the flood.
    lines = data.split(b"\r\n")[1:]
    done = lines.index(b"flood done")
    assert lines[done - 1].startswith(b"flood %08d " % (FLOOD_LINES - 1))
    numbers = [int(m.group(1)) for line in lines if (m := re.fullmatch(rb"flood (\d{8}) x{48}", line))]
    assert len(numbers) > 100 and numbers == list(range(numbers[0], FLOOD_LINES))
    # And the guest is still served.
    assert capped.client(record.id).guest_details().kernel_release

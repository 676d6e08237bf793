"""The VMM's memory split from /proc/<pid>/smaps, on a fake /proc and on a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmsandbox.errors import NotFound
from kvmsandbox.host import proc as host
from kvmsandbox.overhead.model import Measurement, Sample, load_measurement

MIB = 1024 * 1024

SMAPS = """\
55ffb860a000-55ffb8a11000 r--p 00000000 fe:00 2170902                    /usr/bin/qemu-system-x86_64
Size:               4124 kB
Rss:                1240 kB
Pss:                1240 kB
VmFlags: rd mr mw me sd
7fd49c000000-7fd49fedb000 rw-p 00000000 fe:00 1510145                    /cache/vmlinux
Size:              64364 kB
Rss:               59328 kB
Pss:               29664 kB
7fd4a7e00000-7fd4b7e00000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              108544 kB
Pss:              108544 kB
7fd4c0000000-7fd4c3fff000 rwxp 00000000 00:00 0
Size:              65532 kB
Rss:               65532 kB
Pss:               65532 kB
7fd4c4000000-7fd4c4100000 rw-p 00000000 00:00 0                          [heap]
Size:               1024 kB
Rss:                1000 kB
Pss:                1000 kB
"""


def fake_proc(tmp_path: Path, pid: int = 42) -> Path:
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "smaps").write_text(SMAPS)
    comm = "qemu-system-x86 (with) spaces"
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
    return tmp_path


def test_guest_ram_and_tcg_cache_are_found_and_the_rest_is_the_vmm(tmp_path: Path) -> None:
    mem = host.vmm_memory(42, 256 * MIB, 64 * MIB, proc=fake_proc(tmp_path))
    assert mem.guest_ram_rss == 108544 * 1024
    assert mem.guest_ram_pss == 108544 * 1024
    assert mem.tcg_cache_pss == 65532 * 1024
    assert mem.pss == (1240 + 29664 + 108544 + 65532 + 1000) * 1024
    # Beyond the guest RAM: binary, the shared half of the kernel file, the TCG cache, the heap.
    assert mem.beyond_guest_ram == (1240 + 29664 + 65532 + 1000) * 1024


def test_guest_ram_in_a_shared_memfd_is_found_too(tmp_path: Path) -> None:
    # With virtio-fs the guest RAM is a shared memfd that virtiofsd maps as well.
    smaps = SMAPS.replace(
        "7fd4a7e00000-7fd4b7e00000 rw-p 00000000 00:00 0\n",
        "7fd4a7e00000-7fd4b7e00000 rw-s 00000000 00:01 1043                       /memfd:ram (deleted)\n",
    )
    proc = fake_proc(tmp_path)
    (proc / "42" / "smaps").write_text(smaps)
    mem = host.vmm_memory(42, 256 * MIB, 64 * MIB, proc=proc)
    assert mem.guest_ram_rss == 108544 * 1024
    assert mem.beyond_guest_ram == (1240 + 29664 + 65532 + 1000) * 1024


def test_a_clones_private_map_of_its_templates_memfd_is_its_guest_ram_in_pss(tmp_path: Path) -> None:
    smaps = SMAPS.replace(
        "7fd4a7e00000-7fd4b7e00000 rw-p 00000000 00:00 0\nSize:             262144 kB\n"
        "Rss:              108544 kB\nPss:              108544 kB\n",
        "7fd4a7e00000-7fd4b7e00000 rw-p 00000000 00:01 77     /memfd:kvmsandbox-template-k (deleted)\n"
        "Size:             262144 kB\nRss:              108544 kB\nPss:               30000 kB\n",
    )
    proc = fake_proc(tmp_path)
    (proc / "42" / "smaps").write_text(smaps)
    mem = host.vmm_memory(42, 256 * MIB, 64 * MIB, proc=proc)
    assert mem.guest_ram_rss == 108544 * 1024 and mem.guest_ram_pss == 30000 * 1024
    assert mem.beyond_guest_ram == (1240 + 29664 + 65532 + 1000) * 1024


def test_a_clones_guest_costs_its_ram_pss_never_more_than_its_own_figures() -> None:
    from kvmsandbox.overhead.measure import template_saving

    figures = {"guest_kernel_reserved": 20 * MIB, "guest_idle_used": 60 * MIB}
    assert template_saving({**figures, "vmm_guest_ram_pss": 30 * MIB}) == 50 * MIB
    # One clone alone shares nothing: its PSS holds the whole template, the saving is none.
    assert template_saving({**figures, "vmm_guest_ram_pss": 130 * MIB}) == 0
    sample = Sample(memory={**figures, "vmm_guest_ram_pss": 30 * MIB, "template_shared": -50 * MIB})
    assert sample.memory_total == 30 * MIB
    assert sample.guest_memory == 80 * MIB  # VM sizing still takes the guest's own view


def test_without_tcg_the_rwx_mapping_is_not_singled_out(tmp_path: Path) -> None:
    mem = host.vmm_memory(42, 256 * MIB, 0, proc=fake_proc(tmp_path))
    assert mem.tcg_cache_pss == 0
    assert mem.beyond_guest_ram == (1240 + 29664 + 65532 + 1000) * 1024


def test_cpu_time_parses_a_command_name_with_spaces(tmp_path: Path) -> None:
    assert host.cpu_seconds(42, proc=fake_proc(tmp_path)) == pytest.approx(400 / os.sysconf("SC_CLK_TCK"))


def test_a_gone_process_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="process 7 is gone"):
        host.vmm_memory(7, MIB, proc=tmp_path)


def test_a_real_process_that_touches_memory_shows_it() -> None:
    # A private anonymous mapping, marked (as QEMU marks guest RAM) so the kernel does not merge it
    # with its neighbours.
    code = (
        "import mmap, time\n"
        "m = mmap.mmap(-1, 48 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "m.madvise(mmap.MADV_DONTFORK)\n"
        "m.write(b'x' * (40 << 20))\n"
        "print('ok', flush=True)\n"
        "time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ok"
        mem = host.vmm_memory(p.pid, 48 * MIB)
        assert mem.guest_ram_rss >= 40 * MIB
        assert mem.pss >= mem.guest_ram_pss >= 40 * MIB
        t0 = host.cpu_seconds(p.pid)
        assert t0 > 0
        time.sleep(0.05)
        assert host.cpu_seconds(p.pid) >= t0
    finally:
        p.kill()
        p.wait()
    assert host.process_pss() > 10 * MIB


def test_measurement_round_trips_and_derives_the_recommendation(tmp_path: Path) -> None:
    samples = [
        Sample(
            memory={"guest_kernel_reserved": 50 * MIB, "guest_idle_used": 30 * MIB, "vmm_beyond_guest_ram": 90 * MIB},
            cpu={"vmm_idle": 20.0, "runtime_idle": 1.0},
        ),
        Sample(
            memory={"guest_kernel_reserved": 50 * MIB, "guest_idle_used": 35 * MIB, "vmm_beyond_guest_ram": 100 * MIB},
            cpu={"vmm_idle": 40.0, "runtime_idle": 1.0},
        ),
    ]
    m = Measurement(samples=samples, margin_percent=10.0, conditions={"accel": "tcg"})
    assert m.observed_memory_bytes == 185 * MIB
    assert m.recommended_memory_bytes == 204 * MIB  # 203.5 rounded up
    assert m.recommended_cpu_millicores == 50  # 41 * 1.1 = 45.1 -> 50
    assert m.guest_memory_bytes == 85 * MIB
    m.save(tmp_path / "m.json")
    again = load_measurement(tmp_path / "m.json")
    assert again.to_json() == m.to_json()

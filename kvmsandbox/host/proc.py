"""What a VMM process costs the host, read from /proc.

QEMU maps the guest's RAM as one mapping of the VM's memory size (anonymous, or a shared memfd when
virtiofsd has to map it too), and under TCG its
translation cache as one anonymous rwx mapping of ``tb-size``. The proportional set size (PSS) of
the whole process minus the PSS of the guest RAM mapping is what the VMM costs beyond the memory
the guest touched; file pages shared between VMMs (the kernel image every QEMU maps) are divided
among them by PSS, which is the fair share of each pod.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.errors import NotFound

KIB = 1024
MIB = 1024 * KIB
# QEMU may round the RAM mapping up for alignment.
_MAPPING_SLACK = 4 * MIB


@dataclass(frozen=True)
class VmmMemory:
    """Bytes. ``pss`` is the whole process; the other figures are parts of it."""

    pss: int
    rss: int
    guest_ram_rss: int
    guest_ram_pss: int
    tcg_cache_pss: int

    @property
    def beyond_guest_ram(self) -> int:
        return max(0, self.pss - self.guest_ram_pss)


def _read(path: Path, pid: int) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise NotFound(f"process {pid} is gone") from None


def vmm_memory(pid: int, guest_ram_bytes: int, tcg_cache_bytes: int = 0, proc: Path = Path("/proc")) -> VmmMemory:
    """The memory of VMM process ``pid`` split into guest RAM, TCG cache and the rest.

    Raises:
        NotFound: the process is gone.
    """
    text = _read(proc / str(pid) / "smaps", pid)
    pss = rss = ram_rss = ram_pss = tcg_pss = 0
    kind = ""
    for line in text.splitlines():
        first = line.split(None, 1)[0] if line else ""
        if "-" in first and not first.endswith(":"):
            # A mapping header: "start-end perms offset dev inode [path]".
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            size = end - start
            anonymous = len(fields) < 6 and fields[4] == "0"
            memfd = len(fields) >= 6 and fields[5].startswith("/memfd:")
            perms = fields[1]
            kind = ""
            ram_sized = guest_ram_bytes <= size <= guest_ram_bytes + _MAPPING_SLACK
            # Anonymous; a memfd shared with virtiofsd; a clone's private map of its template's memfd.
            if ram_sized and ((anonymous and perms == "rw-p") or (memfd and perms in ("rw-s", "rw-p"))):
                kind = "ram"
            elif anonymous and tcg_cache_bytes and tcg_cache_bytes - _MAPPING_SLACK <= size <= tcg_cache_bytes:
                kind = "tcg" if perms == "rwxp" else ""
            continue
        if first == "Pss:":
            value = int(line.split()[1]) * KIB
            pss += value
            if kind == "ram":
                ram_pss += value
            elif kind == "tcg":
                tcg_pss += value
        elif first == "Rss:":
            value = int(line.split()[1]) * KIB
            rss += value
            if kind == "ram":
                ram_rss += value
    return VmmMemory(pss=pss, rss=rss, guest_ram_rss=ram_rss, guest_ram_pss=ram_pss, tcg_cache_pss=tcg_pss)


def cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """User plus system CPU time of every thread of ``pid`` since it started.

    Raises:
        NotFound: the process is gone.
    """
    text = _read(proc / str(pid) / "stat", pid)
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    fields = text.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def process_pss(pid: int | None = None, proc: Path = Path("/proc")) -> int:
    """PSS of a process (this one by default), in bytes."""
    pid = pid or os.getpid()
    for line in _read(proc / str(pid) / "smaps_rollup", pid).splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * KIB
    return 0


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The host's MemAvailable in bytes, or None when it cannot be read. Raises nothing."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        return None
    return None

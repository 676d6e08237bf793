"""What a removed sandbox could leave behind on the host, looked up for real."""

from __future__ import annotations

from pathlib import Path

from kvmsandbox.host.mounts import mounts_below as mount_table_below


def processes_mentioning(word: str) -> list[int]:
    """Pids whose command line contains ``word`` (a VM name appears in QEMU's)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if word.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def mounts_below(path: Path) -> list[str]:
    return [m.mount_point for m in mount_table_below(path.resolve())]


def mounts_inside(path: Path) -> list[str]:
    """Mounts strictly below ``path`` (not ``path`` itself, which may be a mount)."""
    return [p for p in mounts_below(path) if p != str(path.resolve())]


def mount_options(path: Path) -> set[str]:
    """The per-mount options of the mount point at ``path``."""
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return set(fields[5].split(","))
    raise AssertionError(f"{path} is not a mount point")

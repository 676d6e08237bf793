"""Reads a container's figures from its cgroup v2 files in the guest: CPU, memory, pids, OOM kills."""

from __future__ import annotations

import time
from pathlib import Path

from kvmsandbox.agent.v1 import agent_pb2 as pb


def _read(cgroup: Path, name: str) -> str:
    try:
        return (cgroup / name).read_text()
    except OSError:
        return ""


def _keyed(cgroup: Path, name: str) -> dict[str, int]:
    """A flat-keyed file (``key value`` per line) as a dict; lines without a number are left out."""
    out: dict[str, int] = {}
    for line in _read(cgroup, name).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _number(cgroup: Path, name: str) -> int:
    """A single-value file; 0 when it is missing or not a number (``max``)."""
    value = _read(cgroup, name).strip()
    return int(value) if value.isdigit() else 0


def container_stats(cgroup: Path) -> pb.ContainerStatsResponse:
    """cgroup v2 figures of the container whose cgroup is ``cgroup``; missing files count as 0."""
    mem = _keyed(cgroup, "memory.stat")
    usage = _number(cgroup, "memory.current")
    return pb.ContainerStatsResponse(
        timestamp_ns=time.time_ns(),
        cpu_usage_ns=_keyed(cgroup, "cpu.stat").get("usage_usec", 0) * 1000,
        memory_usage_bytes=usage,
        memory_working_set_bytes=max(0, usage - mem.get("inactive_file", 0)),
        memory_rss_bytes=mem.get("anon", 0),
        pids=_number(cgroup, "pids.current"),
        memory_limit_bytes=_number(cgroup, "memory.max"),
        oom_kills=_keyed(cgroup, "memory.events").get("oom_kill", 0),
    )


def oom_kills(cgroup: Path) -> int:
    """OOM kills in the cgroup (kept until crun delete removes the cgroup)."""
    try:
        for line in (cgroup / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0

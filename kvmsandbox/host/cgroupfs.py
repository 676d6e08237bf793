"""The host's cgroup trees as mounted: which version, which v1 hierarchies, whether VMMs can be
accounted here at all, and finding a cgroup by name. Everything that changes cgroups is in
``cgroups.py``."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# The v1 hierarchies a VMM is placed in, in the order they are written.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
# The v2 controllers enabled for children along the path; only memory is required.
V2_CONTROLLERS = ("memory", "cpu", "pids")


def version(root: Path) -> int:
    return 2 if (root / "cgroup.controllers").is_file() else 1


def v1_hierarchies(root: Path) -> dict[str, Path]:
    """The mounted v1 hierarchies among :data:`V1_CONTROLLERS`, by controller.

    A hierarchy is a directory holding ``cgroup.procs``. Controllers mounted together
    (``cpu,cpuacct`` with ``cpu`` and ``cpuacct`` as symlinks to it) share one directory.
    """
    found: dict[str, Path] = {}
    for name in V1_CONTROLLERS:
        d = root / name
        if (d / "cgroup.procs").is_file():
            found[name] = d
    return found


def _read_text(path: Path) -> str:
    return path.read_text()


def cgroups_available(root: Path = CGROUP_ROOT) -> tuple[bool, str]:
    """Whether VMMs can be accounted in host cgroups here, and what was found or why not.

    True needs memory accounting (a v1 memory hierarchy or the v2 memory controller) in a tree
    that is writable.
    """
    if not root.is_dir():
        return False, f"{root} does not exist"
    if version(root) == 2:
        try:
            controllers = _read_text(root / "cgroup.controllers").split()
        except OSError as e:
            return False, f"cannot read {root / 'cgroup.controllers'}: {e.strerror}"
        if "memory" not in controllers:
            return False, f"the cgroup v2 tree at {root} has no memory controller"
        found = [c for c in V2_CONTROLLERS if c in controllers]
        writable_dir, label = root, f"cgroup v2 ({', '.join(found)})"
    else:
        hierarchies = v1_hierarchies(root)
        if "memory" not in hierarchies:
            return False, f"neither a cgroup v1 memory hierarchy ({root / 'memory'}) nor a cgroup v2 tree is mounted"
        writable_dir, label = hierarchies["memory"], f"cgroup v1 ({', '.join(hierarchies)})"
    if os.statvfs(writable_dir).f_flag & os.ST_RDONLY:
        return False, f"{writable_dir} is mounted read-only"
    if not os.access(writable_dir, os.W_OK):
        return False, f"{writable_dir} is not writable by this process"
    return True, label


def find_cgroups(leaf: str, root: Path = CGROUP_ROOT, max_depth: int = 8) -> list[str]:
    """Paths of the cgroups named ``leaf`` in the memory hierarchy (v1) or the unified tree (v2),
    at most ``max_depth`` levels down: for a VMM cgroup whose record was lost. cgroupfs is the
    kernel's, not a tree anyone else can plant links in; the walk does not follow links anyway."""
    if not root.is_dir():
        return []
    base = root if version(root) == 2 else v1_hierarchies(root).get("memory")
    if base is None:
        return []
    found = []
    for dirpath, dirnames, _ in os.walk(base):
        rel = Path(dirpath).relative_to(base)
        if len(rel.parts) >= max_depth:
            dirnames.clear()
        if leaf in dirnames:
            found.append("/" + str(rel / leaf).lstrip("./"))
    return found

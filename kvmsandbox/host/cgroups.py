"""Host cgroup accounting for a pod's VMM (QEMU) process.

A :class:`HostCgroup` is one cgroup path, such as ``/kubepods/burstable/pod<uid>/kvmsandbox-<id>``,
in every hierarchy that matters for accounting: on cgroup v1 the memory, cpu, cpuacct and pids
hierarchies that are mounted below the root (``cpu,cpuacct`` mounted together counts once); on
cgroup v2 the one unified tree. The runtime creates it, moves the VMM in, reads its usage for
PodSandboxStats and removes it at teardown, removing only the parent cgroups it created itself.

Memory charges: a page is charged to the cgroup of the process that first touched it, and moving a
process does not move its charges. cgroup v1 could move them when
``memory.move_charge_at_immigrate`` is 3 on the destination, so :meth:`HostCgroup.create` asks for
that, but newer kernels deprecate it and then reject the write (6.18 answers EINVAL). cgroup v2
never moves charges. Either way, move the VMM before it touches guest RAM to have it all accounted.

The version is read from the root: ``<root>/cgroup.controllers`` exists only when the root is a
cgroup v2 mount (a pure v2 host). On a hybrid host the v1 hierarchies are used and the cgroup2
mount at ``<root>/unified`` (which holds no controllers there) is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kvmsandbox.errors import FailedPrecondition, InvalidArgument, NotFound
from kvmsandbox.host.cgroupfs import CGROUP_ROOT, V2_CONTROLLERS, v1_hierarchies, version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CgroupUsage:
    """What a cgroup uses now: memory in bytes, CPU time in nanoseconds since it was created."""

    memory_usage_bytes: int
    memory_working_set_bytes: int
    cpu_usage_ns: int


def _read_text(path: Path) -> str:
    return path.read_text()


def _read_int(path: Path) -> int:
    return int(_read_text(path).strip())


def _read_keyed(path: Path) -> dict[str, int]:
    """A flat keyed file such as memory.stat or cpu.stat: one "key value" per line."""
    values: dict[str, int] = {}
    for line in _read_text(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def _read_pids(procs: Path) -> list[int]:
    return sorted({int(line) for line in _read_text(procs).split()})


def _check_path(path: str, what: str = "cgroup path") -> str:
    if not isinstance(path, str) or not path.startswith("/") or path == "/":
        raise InvalidArgument(f"{what} {path!r} must be an absolute path below the root cgroup, like /kubepods/pod1")
    if "\0" in path or path.startswith("//") or posixpath.normpath(path) != path or ".." in path.split("/"):
        raise InvalidArgument(f"{what} {path!r} must be normalized: no '..', '.', empty parts or trailing '/'")
    return path


class HostCgroup:
    """One cgroup path (e.g. "/kubepods/burstable/pod<uid>/kvmsandbox-<id>") in every hierarchy that matters:
    v1 memory, cpu, cpuacct, pids (those that are mounted) or the v2 unified tree."""

    def __init__(self, path: str, root: Path = CGROUP_ROOT) -> None:
        self.path = _check_path(path)
        self.root = root
        self._parts = path.strip("/").split("/")

    def __repr__(self) -> str:
        return f"HostCgroup({self.path!r}, root={str(self.root)!r})"

    @cached_property
    def version(self) -> int:
        """1 or 2, detected from the root: v2 only when the root itself is a cgroup2 mount."""
        return version(self.root)

    @cached_property
    def _hierarchies(self) -> list[Path]:
        """The hierarchy roots this cgroup lives in, each once, memory first."""
        if self.version == 2:
            return [self.root]
        unique: list[Path] = []
        seen: set[Path] = set()
        for d in v1_hierarchies(self.root).values():
            real = d.resolve()
            if real not in seen:
                seen.add(real)
                unique.append(d)
        return unique

    def _in(self, hierarchy: Path, path: str | None = None) -> Path:
        return hierarchy / (self.path if path is None else path).lstrip("/")

    def _memory_dir(self) -> Path:
        """The leaf in the hierarchy that accounts memory (v1 memory, or the unified tree)."""
        if self.version == 2:
            return self._in(self.root)
        memory = v1_hierarchies(self.root).get("memory")
        if memory is None:
            raise FailedPrecondition(f"no cgroup v1 memory hierarchy is mounted at {self.root / 'memory'}")
        return self._in(memory)

    # -- creating -----------------------------------------------------------------------

    def create(self) -> list[str]:
        """Creates the cgroup and its missing parents in every hierarchy (mkdir -p).

        Returns the cgroup paths, outermost first, that existed in no hierarchy before and were
        created now, so the caller can record them and have :meth:`remove` take away exactly
        those. A path that existed in some hierarchy is not returned even if it was completed in
        others: it belongs to someone else. If creating fails, what was made is removed again.

        Raises:
            FailedPrecondition: no memory accounting (v1 memory hierarchy not mounted, v2 memory
                controller not available), or the kernel refused a mkdir or a controller.
        """
        hierarchies = self._hierarchies
        if self.version == 1 and "memory" not in v1_hierarchies(self.root):
            raise FailedPrecondition(
                f"cannot create cgroup {self.path}: no cgroup v1 memory hierarchy is mounted at {self.root / 'memory'}"
            )
        made: list[Path] = []
        created: list[str] = []
        try:
            for depth in range(1, len(self._parts) + 1):
                path = "/" + "/".join(self._parts[:depth])
                existed = False
                for h in hierarchies:
                    if self.version == 2:
                        self._enable_v2_controllers(self._in(h, posixpath.dirname(path)), posixpath.dirname(path))
                    d = self._in(h, path)
                    if self._mkdir(d, path, h):
                        made.append(d)
                    else:
                        existed = True
                if not existed:
                    created.append(path)
        except BaseException:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        if self.version == 1:
            try:
                (self._memory_dir() / "memory.move_charge_at_immigrate").write_text("3")
            except OSError as e:
                # Deprecated by newer kernels, which then reject the write: charges stay behind.
                log.debug("cgroup %s: memory charges will not move with processes: %s", self.path, e.strerror)
        return created

    @staticmethod
    def _mkdir(d: Path, path: str, hierarchy: Path) -> bool:
        """mkdir ``d`` (cgroup ``path`` in ``hierarchy``); False when it existed already."""
        try:
            d.mkdir()
        except FileExistsError:
            return False
        except OSError as e:
            raise FailedPrecondition(f"cannot create cgroup {path} in {hierarchy}: {e.strerror}") from None
        return True

    def _enable_v2_controllers(self, parent: Path, parent_path: str) -> None:
        """Enables memory (required), cpu and pids for the children of v2 cgroup ``parent``."""
        try:
            available = set(_read_text(parent / "cgroup.controllers").split())
            enabled = set(_read_text(parent / "cgroup.subtree_control").split())
        except OSError as e:
            raise FailedPrecondition(f"cannot read the controllers of cgroup {parent_path}: {e.strerror}") from None
        if "memory" not in available:
            raise FailedPrecondition(
                f"cannot create cgroup {self.path}: the memory controller is not available in cgroup {parent_path}"
                " (its parent does not enable it for children)"
            )
        for controller in V2_CONTROLLERS:
            if controller in enabled or controller not in available:
                continue
            try:
                fd = os.open(parent / "cgroup.subtree_control", os.O_WRONLY)
                try:
                    os.write(fd, f"+{controller}".encode())
                finally:
                    os.close(fd)
            except OSError as e:
                if controller == "memory":
                    hint = " (a v2 cgroup that holds processes cannot enable controllers for children)"
                    raise FailedPrecondition(
                        f"cannot enable the memory controller below cgroup {parent_path}: {e.strerror}"
                        + (hint if e.errno == errno.EBUSY else "")
                    ) from None
                log.warning("cgroup %s: the %s controller stays off for children: %s", parent_path, controller, e)

    # -- processes ----------------------------------------------------------------------

    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` file of the leaf in every hierarchy: writing a pid to each moves
        the process in (a VMM started by a wrapper writes its own before it runs QEMU)."""
        return [self._in(h) / "cgroup.procs" for h in self._hierarchies]

    def add_process(self, pid: int) -> None:
        """Moves process ``pid`` with all its threads into the cgroup in every hierarchy.

        Raises:
            InvalidArgument: ``pid`` is not a positive number (0 would move the caller itself).
            NotFound: the process is gone.
            FailedPrecondition: the cgroup does not exist or the kernel refused the move.
        """
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise InvalidArgument(f"cannot move process {pid!r} into cgroup {self.path}: a pid is a positive number")
        for h in self._hierarchies:
            procs = self._in(h) / "cgroup.procs"
            try:
                fd = os.open(procs, os.O_WRONLY)
                try:
                    os.write(fd, str(pid).encode())
                finally:
                    os.close(fd)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise NotFound(f"process {pid} is gone; it cannot be moved into cgroup {self.path}") from None
                if e.errno == errno.ENOENT:
                    raise FailedPrecondition(
                        f"cgroup {self.path} does not exist in {h}; create it before moving process {pid} in"
                    ) from None
                raise FailedPrecondition(
                    f"cannot move process {pid} into cgroup {self.path} in {h}: {e.strerror}"
                ) from None

    def pids(self) -> list[int]:
        """The processes in the cgroup (memory hierarchy on v1, the unified tree on v2), sorted.

        Raises:
            NotFound: the cgroup does not exist.
        """
        try:
            return _read_pids(self._memory_dir() / "cgroup.procs")
        except FileNotFoundError:
            raise NotFound(f"cgroup {self.path} does not exist") from None

    def exists(self) -> bool:
        """True when the cgroup exists in any of its hierarchies (so there is something to remove)."""
        return any(self._in(h).is_dir() for h in self._hierarchies)

    # -- usage --------------------------------------------------------------------------

    def usage(self) -> CgroupUsage:
        """Memory and CPU use now, as kubelet/cadvisor compute them.

        The working set is the usage minus inactive file pages (v1 ``total_inactive_file``, v2
        ``inactive_file``), never below 0. CPU time is 0 when nothing accounts it (v1 without a
        cpuacct hierarchy).

        Raises:
            NotFound: the cgroup does not exist.
            FailedPrecondition: memory is not accounted for it.
        """
        memory = self._memory_dir()
        if not memory.is_dir():
            raise NotFound(f"cgroup {self.path} does not exist")
        try:
            if self.version == 2:
                usage = _read_int(memory / "memory.current")
                inactive = _read_keyed(memory / "memory.stat").get("inactive_file", 0)
                cpu_ns = self._v2_cpu_ns(memory)
            else:
                usage = _read_int(memory / "memory.usage_in_bytes")
                inactive = _read_keyed(memory / "memory.stat").get("total_inactive_file", 0)
                cpu_ns = self._v1_cpu_ns()
        except FileNotFoundError as e:
            if not memory.is_dir():
                raise NotFound(f"cgroup {self.path} does not exist") from None
            raise FailedPrecondition(
                f"cgroup {self.path} does not account memory: {Path(str(e.filename)).name} is missing"
            ) from None
        return CgroupUsage(
            memory_usage_bytes=usage,
            memory_working_set_bytes=max(0, usage - inactive),
            cpu_usage_ns=cpu_ns,
        )

    def _v1_cpu_ns(self) -> int:
        cpuacct = v1_hierarchies(self.root).get("cpuacct")
        if cpuacct is None:
            return 0
        try:
            return _read_int(self._in(cpuacct) / "cpuacct.usage")
        except FileNotFoundError:
            return 0

    @staticmethod
    def _v2_cpu_ns(leaf: Path) -> int:
        try:
            return _read_keyed(leaf / "cpu.stat").get("usage_usec", 0) * 1000
        except FileNotFoundError:
            return 0

    # -- removing -----------------------------------------------------------------------

    def remove(self, created: list[str] | None = None, timeout: float = 5.0) -> None:
        """Removes the cgroup in every hierarchy, then the parents in ``created`` that are empty.

        The leaf is retried while the kernel says it is busy, until ``timeout`` seconds have
        passed: a VMM that was just killed takes a moment to leave. The parents are tried once
        each, deepest first, and stay when busy (another pod's cgroup is in them); no other path
        is touched. Missing directories are fine, so removing twice is harmless.

        Raises:
            InvalidArgument: a path in ``created`` is not this cgroup or one of its parents.
            FailedPrecondition: the cgroup still holds processes (named) or child cgroups after
                ``timeout``, or the kernel refused the rmdir.
        """
        parents: list[str] = []
        for p in created or []:
            _check_path(p, "created cgroup path")
            if p != self.path and not self.path.startswith(p + "/"):
                raise InvalidArgument(f"created cgroup path {p} is not cgroup {self.path} or one of its parents")
            if p != self.path:
                parents.append(p)
        self._remove_leaf(timeout)
        for p in sorted(set(parents), key=lambda p: p.count("/"), reverse=True):
            for h in self._hierarchies:
                try:
                    self._in(h, p).rmdir()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise FailedPrecondition(f"cannot remove cgroup {p} in {h}: {e.strerror}") from None
                    log.debug("cgroup %s in %s stays: it is not empty", p, h)

    def _remove_leaf(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        remaining = list(self._hierarchies)
        delay = 0.001
        while True:
            busy: list[Path] = []
            for h in remaining:
                d = self._in(h)
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise FailedPrecondition(f"cannot remove cgroup {self.path} in {h}: {e.strerror}") from None
                    busy.append(h)
            remaining = busy
            if not remaining:
                return
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.05)
        raise FailedPrecondition(self._busy_reason(remaining, timeout))

    def _busy_reason(self, busy: list[Path], timeout: float) -> str:
        pids: set[int] = set()
        children: set[str] = set()
        for h in busy:
            d = self._in(h)
            try:
                pids.update(_read_pids(d / "cgroup.procs"))
                children.update(c.name for c in d.iterdir() if c.is_dir())
            except OSError:
                continue
        where = ", ".join(str(h) for h in busy)
        if pids:
            listed = ", ".join(str(p) for p in sorted(pids))
            return (
                f"cgroup {self.path} still holds processes {listed} after {timeout:g} s (in {where});"
                " they must exit before it can be removed"
            )
        if children:
            return f"cgroup {self.path} still has child cgroups {', '.join(sorted(children))} (in {where})"
        return f"cgroup {self.path} stayed busy for {timeout:g} s (in {where})"

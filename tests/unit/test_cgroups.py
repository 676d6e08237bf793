"""Host cgroups for the VMM: for real against /sys/fs/cgroup (as root), and v1/v2 file parsing on fake trees."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmsandbox.errors import FailedPrecondition, InvalidArgument, NotFound
from kvmsandbox.host.cgroupfs import cgroups_available, find_cgroups
from kvmsandbox.host.cgroups import CgroupUsage, HostCgroup
from tests.waiting import WaitTimeout, wait_until

MIB = 1024 * 1024
ROOT = Path("/sys/fs/cgroup")

# Waits for a line, then allocates and touches 30 MiB (charged to the cgroup it is in by then), says
# so, and waits again; it exits by itself when its stdin closes.
CHILD = """\
import sys
sys.stdin.readline()
x = bytearray(30 << 20)
for i in range(0, len(x), 4096):
    x[i] = 1
print("ready", flush=True)
sys.stdin.readline()
"""

real_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or not cgroups_available()[0],
    reason=f"needs root and usable host cgroups ({cgroups_available()[1]})",
)


def hierarchy_roots() -> list[Path]:
    """Every cgroup hierarchy mounted below /sys/fs/cgroup (or the root itself on pure v2)."""
    if (ROOT / "cgroup.controllers").is_file():
        return [ROOT]
    return sorted(d for d in ROOT.iterdir() if not d.is_symlink() and (d / "cgroup.procs").is_file())


def own_cgroups() -> dict[str, str]:
    """This process's cgroup in each hierarchy, by the hierarchy's directory name ("" for pure v2)."""
    found: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if not controllers:
            found["" if (ROOT / "cgroup.controllers").is_file() else "unified"] = path
        else:
            found[controllers.removeprefix("name=")] = path
    return found


def proc_cgroups(pid: int) -> dict[str, str]:
    """The cgroup of ``pid`` per controller, as /proc/<pid>/cgroup says ("" is the v2 tree)."""
    found: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            found[c] = path
    return found


@dataclass
class Env:
    """A unique test parent cgroup and the child processes of one test, cleaned up whatever happens."""

    parent: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def spawn(self) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        own = own_cgroups()
        for h in hierarchy_roots():
            top = h / self.parent.lstrip("/")
            if not top.exists():
                continue
            home = h / own.get(h.name if h != ROOT else "", "/").lstrip("/")
            home = home if home.is_dir() else h
            dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda d: len(d.parts), reverse=True)
            for d in dirs:
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (home / "cgroup.procs").write_text(pid)
                # Best effort: the cleanup goes on past a cgroup that stays busy for 2 s.
                with contextlib.suppress(WaitTimeout):
                    wait_until(functools.partial(rmdir_unless_busy, d), 2, f"{d} to be removable", interval=0.01)


def rmdir_unless_busy(d: Path) -> bool:
    """Removes ``d``; False only while the kernel still reports it busy (worth another try)."""
    try:
        d.rmdir()
    except OSError as e:
        return e.errno != errno.EBUSY
    return True


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env(parent=f"/kvmsandbox-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield e
    finally:
        e.cleanup()


def leftovers(parent: str) -> list[Path]:
    return [h / parent.lstrip("/") for h in hierarchy_roots() if (h / parent.lstrip("/")).exists()]


def move_and_allocate(cg: HostCgroup, p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None and p.stdout is not None
    cg.add_process(p.pid)
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ready"


# -- the real host ----------------------------------------------------------------------------


@real_cgroups
def test_this_host_has_usable_cgroups() -> None:
    ok, what = cgroups_available()
    assert ok, what
    version = HostCgroup("/x").version
    assert what.startswith(f"cgroup v{version} (memory")


@real_cgroups
def test_a_process_is_accounted_and_everything_created_is_removed(env: Env) -> None:
    path = f"{env.parent}/a/b"
    cg = HostCgroup(path)
    assert not cg.exists()
    created = cg.create()
    assert created == [env.parent, f"{env.parent}/a", path]
    assert cg.exists()
    assert cg.create() == []  # idempotent, and nothing is new the second time

    p = env.spawn()
    move_and_allocate(cg, p)
    where = proc_cgroups(p.pid)
    if cg.version == 1:
        assert where["memory"] == path
        for controller in ("cpu", "cpuacct", "pids"):
            if (ROOT / controller / "cgroup.procs").is_file():
                assert where[controller] == path, controller
    else:
        assert where[""] == path

    usage = cg.usage()
    assert usage.memory_usage_bytes >= 25 * MIB
    assert 0 <= usage.memory_working_set_bytes <= usage.memory_usage_bytes
    assert usage.memory_working_set_bytes >= 25 * MIB  # anonymous memory, not inactive file pages
    assert usage.cpu_usage_ns > 0  # touching 7680 pages takes CPU
    assert cg.pids() == [p.pid]

    p.kill()
    p.wait()
    cg.remove(created)
    assert not cg.exists()
    assert leftovers(env.parent) == []


@real_cgroups
def test_remove_takes_only_the_paths_this_cgroup_created(env: Env) -> None:
    first = HostCgroup(f"{env.parent}/a/b")
    second = HostCgroup(f"{env.parent}/a/c")
    created_first = first.create()
    created_second = second.create()
    assert created_second == [f"{env.parent}/a/c"]  # the parents were there already

    # The parents it created stay while the sibling is in them, and that is no error.
    first.remove(created_first)
    assert not first.exists()
    assert second.exists()
    # The sibling never created the parents: they stay after it is gone.
    second.remove(created_second)
    assert not second.exists()
    assert HostCgroup(f"{env.parent}/a").exists()
    # Removing the first one again now takes its parents, which are empty.
    first.remove(created_first)
    assert leftovers(env.parent) == []


@real_cgroups
def test_remove_is_idempotent(env: Env) -> None:
    cg = HostCgroup(f"{env.parent}/x")
    cg.remove()  # never created
    created = cg.create()
    cg.remove(created)
    cg.remove(created)
    assert leftovers(env.parent) == []


@real_cgroups
def test_remove_with_a_process_inside_names_it(env: Env) -> None:
    cg = HostCgroup(f"{env.parent}/busy")
    created = cg.create()
    p = env.spawn()
    cg.add_process(p.pid)
    start = time.monotonic()
    with pytest.raises(FailedPrecondition, match=rf"\b{p.pid}\b"):
        cg.remove(created, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 3
    assert cg.exists()
    assert cg.pids() == [p.pid]  # nothing was taken away from under it


@real_cgroups
def test_a_gone_process_is_not_found(env: Env) -> None:
    cg = HostCgroup(f"{env.parent}/gone")
    cg.create()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(NotFound, match=str(p.pid)):
        cg.add_process(p.pid)
    with pytest.raises(InvalidArgument):
        cg.add_process(0)  # 0 would move the caller


@real_cgroups
def test_a_missing_cgroup(env: Env) -> None:
    cg = HostCgroup(f"{env.parent}/never")
    assert not cg.exists()
    with pytest.raises(NotFound):
        cg.usage()
    with pytest.raises(NotFound):
        cg.pids()
    with pytest.raises(FailedPrecondition, match="does not exist"):
        cg.add_process(os.getpid())


@pytest.mark.skipif(
    os.geteuid() != 0
    or not (ROOT / "unified" / "cgroup.controllers").is_file()
    or "memory" in (ROOT / "unified" / "cgroup.controllers").read_text().split(),
    reason="needs a cgroup2 mount at /sys/fs/cgroup/unified without the memory controller",
)
def test_v2_without_memory_creates_nothing() -> None:
    unified = ROOT / "unified"
    name = f"/kvmsandbox-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cg = HostCgroup(f"{name}/a", root=unified)
    assert cg.version == 2
    assert cgroups_available(unified)[0] is False
    try:
        with pytest.raises(FailedPrecondition, match="memory controller"):
            cg.create()
        assert not (unified / name.lstrip("/")).exists()
    finally:
        for d in (unified / name.lstrip("/") / "a", unified / name.lstrip("/")):
            with contextlib.suppress(OSError):
                d.rmdir()


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["relative", "/a/../b", "/..", "/", "", "/a/", "//a", "/a//b", "/a/./b", "a/b"])
def test_invalid_paths(path: str) -> None:
    with pytest.raises(InvalidArgument):
        HostCgroup(path)


def test_remove_refuses_created_paths_outside_the_cgroup(tmp_path: Path) -> None:
    cg = HostCgroup("/kubepods/pod1/x", root=tmp_path)
    for bad in (["/other"], ["/kubepods/pod"], ["/kubepods/pod1/x/y"], ["relative"]):
        with pytest.raises(InvalidArgument):
            cg.remove(bad)


# -- fake trees -------------------------------------------------------------------------------


def fake_v2(tmp_path: Path, path: str, files: dict[str, str]) -> HostCgroup:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    leaf = tmp_path / path.lstrip("/")
    leaf.mkdir(parents=True)
    for name, text in files.items():
        (leaf / name).write_text(text)
    return HostCgroup(path, root=tmp_path)


V2_MEMORY_STAT = """\
anon 73400320
file 41943040
kernel 1048576
active_anon 73400320
inactive_anon 0
active_file 10485760
inactive_file 31457280
unevictable 0
"""


def test_v2_usage(tmp_path: Path) -> None:
    cg = fake_v2(
        tmp_path,
        "/kubepods/pod1/kvmsandbox-1",
        {
            "memory.current": "115343360\n",
            "memory.stat": V2_MEMORY_STAT,
            "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n",
        },
    )
    assert cg.version == 2
    assert cg.usage() == CgroupUsage(
        memory_usage_bytes=115343360,
        memory_working_set_bytes=115343360 - 31457280,
        cpu_usage_ns=1_500_000,
    )


def test_v2_working_set_is_never_negative_and_cpu_is_optional(tmp_path: Path) -> None:
    cg = fake_v2(tmp_path, "/p", {"memory.current": "4096\n", "memory.stat": "inactive_file 8192\n"})
    assert cg.usage() == CgroupUsage(memory_usage_bytes=4096, memory_working_set_bytes=0, cpu_usage_ns=0)


def test_v2_without_memory_accounting(tmp_path: Path) -> None:
    cg = fake_v2(tmp_path, "/p", {"cpu.stat": "usage_usec 1\n"})
    with pytest.raises(FailedPrecondition, match="memory"):
        cg.usage()


def test_v2_available(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert cgroups_available(tmp_path) == (True, "cgroup v2 (memory, cpu, pids)")
    (tmp_path / "cgroup.controllers").write_text("cpu io pids\n")
    ok, why = cgroups_available(tmp_path)
    assert not ok
    assert "no memory controller" in why


def test_v1_usage_and_availability(tmp_path: Path) -> None:
    for h in ("memory", "cpuacct"):
        (tmp_path / h / "p").mkdir(parents=True)
        (tmp_path / h / "cgroup.procs").write_text("")
    leaf = tmp_path / "memory" / "p"
    (leaf / "memory.usage_in_bytes").write_text("10485760\n")
    # Only the hierarchical total counts, as in cadvisor.
    (leaf / "memory.stat").write_text("inactive_file 1\ntotal_inactive_file 4194304\ntotal_rss 6291456\n")
    (tmp_path / "cpuacct" / "p" / "cpuacct.usage").write_text("123456789\n")
    cg = HostCgroup("/p", root=tmp_path)
    assert cg.version == 1
    assert cg.usage() == CgroupUsage(10485760, 10485760 - 4194304, 123456789)
    assert cgroups_available(tmp_path) == (True, "cgroup v1 (memory, cpuacct)")

    # No cpuacct hierarchy: no CPU figure, but memory still.
    (tmp_path / "cpuacct" / "cgroup.procs").unlink()
    assert cg.usage().cpu_usage_ns == 0


def test_no_memory_hierarchy_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cgroup.procs").write_text("")
    ok, why = cgroups_available(tmp_path)
    assert not ok
    assert "memory" in why
    assert cgroups_available(tmp_path / "missing")[0] is False
    with pytest.raises(FailedPrecondition, match="memory hierarchy"):
        HostCgroup("/p", root=tmp_path).create()
    assert not (tmp_path / "cpu" / "p").exists()


def test_a_vmm_cgroup_is_found_by_its_name_wherever_it_was_placed(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    for d in ("kubepods/burstable/pod1/kvmsandbox-0123456789abcdef", "kvmsandbox/kvmsandbox-fedcba9876543210"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "a/b/c/d/e/f/g/h/i/kvmsandbox-0123456789abcdef").mkdir(parents=True)
    assert find_cgroups("kvmsandbox-0123456789abcdef", root=tmp_path) == [
        "/kubepods/burstable/pod1/kvmsandbox-0123456789abcdef"
    ]
    assert find_cgroups("kvmsandbox-none", root=tmp_path) == []
    assert find_cgroups("x", root=tmp_path / "missing") == []

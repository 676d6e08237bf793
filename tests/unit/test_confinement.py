"""Reading a VMM's confinement from /proc (a fake /proc tree here; real QEMUs in tests/vm)."""

from __future__ import annotations

import os
from pathlib import Path

from kvmsandbox.host import ipc
from kvmsandbox.host.confinement import Confinement, of_process, running_vmms


def fake_process(proc: Path, pid: int, argv: list[str], status: str, mnt: str) -> None:
    d = proc / str(pid)
    (d / "ns").mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "status").write_text(status)
    os.symlink(mnt, d / "ns" / "mnt")


def fake_proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    os.symlink("mnt:[4026531841]", proc / "self" / "ns" / "mnt")
    status = "Name:\tqemu\nUid:\t64055\t64055\t64055\t64055\nCapEff:\t0000000000000000\nSeccomp:\t2\n"
    fake_process(proc, 10, ["qemu", "-name", "guest=kvmsandbox-a,debug-threads=on"], status, "mnt:[4026532001]")
    root = "Name:\tqemu\nUid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\nSeccomp:\t0\n"
    fake_process(proc, 11, ["qemu", "-name", "guest=kvmsandbox-b"], root, "mnt:[4026531841]")
    fake_process(proc, 12, ["qemu", "-name", "guest=someone-else"], root, "mnt:[4026531841]")
    fake_process(proc, 13, ["sleep", "-name", "guest=kvmsandbox-c", "x"], "Name:\tgarbled\n", "mnt:[1]")
    return proc


def test_a_confined_and_an_unconfined_vmm_are_told_apart(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    assert of_process(10, proc) == Confinement(10, "kvmsandbox-a", 64055, 2, True, 0)
    assert of_process(11, proc) == Confinement(11, "kvmsandbox-b", 0, 0, False, 0x1FFFFFFFFFF)


def test_other_processes_and_unreadable_status_are_not_listed(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    assert of_process(12, proc) is None and of_process(13, proc) is None and of_process(99, proc) is None
    assert [c.pid for c in running_vmms(proc)] == [10, 11]


def test_ipc_objects_of_a_uid_are_found_by_owner_or_creator(tmp_path: Path) -> None:
    (tmp_path / "shm").write_text(
        "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid\n"
        "         0         10   600               1048576   100   100      0   2000000007 5 2000000007 5\n"
        "         0         11   600               1048576   100   100      0     0     0     0     0\n"
    )
    (tmp_path / "msg").write_text(
        "       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid\n"
        "         0         20   600           0          0     0     0     0     0 2000000007 5\n"
        "garbage line\n"
    )
    (tmp_path / "sem").write_text("       key      semid perms      nsems   uid   gid  cuid  cgid\n")
    assert ipc.owned_by(2000000007, tmp_path) == [("-m", 10), ("-q", 20)]
    assert ipc.owned_by(1, tmp_path) == []
    assert ipc.remove_owned_by(0) == 0  # never root's

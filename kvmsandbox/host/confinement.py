"""How the VMMs on this host are confined, read from /proc: what ``kvmsandbox doctor`` reports
and the tests check."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# Both backends start QEMU with ``-name guest=<vm name>,...`` and VM names start with this; VM
# templates being built and warm-pool clones (whose QEMU keeps that name once a pod adopts it) with
# the second.
VM_NAME_PREFIX = "kvmsandbox-"
TEMPLATE_VM_NAME_PREFIX = "kvsb-"


@dataclass(frozen=True)
class Confinement:
    """One QEMU process: its real uid, its seccomp mode (0 none, 1 strict, 2 filter), whether it
    shares this process's mount namespace, and its effective capabilities (a bit mask)."""

    pid: int
    vm_name: str
    uid: int
    seccomp: int
    own_mount_namespace: bool
    capabilities: int


def of_process(pid: int, proc: Path = PROC) -> Confinement | None:
    """The confinement of ``pid`` if it is a QEMU of ours, else None. Raises nothing."""
    try:
        args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
        status = (proc / str(pid) / "status").read_text()
        mnt = os.readlink(proc / str(pid) / "ns" / "mnt")
        ours = os.readlink(proc / "self" / "ns" / "mnt")
    except OSError:
        return None
    name = ""
    for flag, value in itertools.pairwise(args):
        if flag == b"-name" and value.startswith(
            (f"guest={VM_NAME_PREFIX}".encode(), f"guest={TEMPLATE_VM_NAME_PREFIX}".encode())
        ):
            name = value.decode(errors="replace").split(",", 1)[0].removeprefix("guest=")
    if not name:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        return Confinement(
            pid=pid,
            vm_name=name,
            uid=int(fields["Uid"].split()[0]),
            seccomp=int(fields.get("Seccomp", "0").strip()),
            own_mount_namespace=mnt != ours,
            capabilities=int(fields["CapEff"].strip(), 16),
        )
    except (KeyError, ValueError, IndexError):
        return None


def uids_in_use(low: int, high: int, proc: Path = PROC) -> set[int]:
    """The real uids in [low, high) of every process on this host (whatever its command line
    says, which a process can rewrite). Raises nothing."""
    found = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    if low <= uid < high:
                        found.add(uid)
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


def running_vmms(proc: Path = PROC) -> list[Confinement]:
    """Every QEMU of ours running on this host. Raises nothing."""
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit() and (c := of_process(int(entry.name), proc)) is not None:
            found.append(c)
    return sorted(found, key=lambda c: c.vm_name)

"""System V IPC objects a process left on the host: a VMM that shares the host's IPC namespace (the
libvirt backend's) can create shared memory, queues and semaphores that outlive it and pin host
memory; they are removed with its VM (by the VM's own uid, which no other process has)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

SYSVIPC = Path("/proc/sysvipc")
# (file, id column, ipcrm flag)
_KINDS = (("shm", "shmid", "-m"), ("msg", "msqid", "-q"), ("sem", "semid", "-s"))


def owned_by(uid: int, root: Path = SYSVIPC) -> list[tuple[str, int]]:
    """(ipcrm flag, id) of every IPC object whose owner or creator is ``uid``. Raises nothing."""
    found = []
    for name, id_column, flag in _KINDS:
        try:
            lines = (root / name).read_text().splitlines()
        except OSError:
            continue
        if not lines:
            continue
        header = lines[0].split()
        try:
            columns = header.index(id_column), header.index("uid"), header.index("cuid")
        except ValueError:
            continue
        for line in lines[1:]:
            fields = line.split()
            try:
                ipc_id, owner, creator = (int(fields[c]) for c in columns)
            except (IndexError, ValueError):
                continue
            if uid in (owner, creator):
                found.append((flag, ipc_id))
    return found


def remove_owned_by(uid: int) -> int:
    """Removes what ``owned_by`` finds (never for root); returns how many. Raises nothing."""
    if uid <= 0:
        return 0
    removed = 0
    for flag, ipc_id in owned_by(uid):
        done = subprocess.run(["ipcrm", flag, str(ipc_id)], capture_output=True, check=False)
        if done.returncode == 0:
            removed += 1
        else:
            log.warning("cannot remove IPC object %s %d of uid %d: %s", flag, ipc_id, uid, done.stderr.decode()[:200])
    return removed

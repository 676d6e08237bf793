"""The uids VMMs run as: one per VM, from a configured range, so no two VMMs share one and a
compromised QEMU cannot signal or trace another pod's (both backends).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterator

from kvmsandbox.errors import HypervisorError
from kvmsandbox.host.confinement import uids_in_use

UID_RANGE = 1 << 20
"""VMs get uids (and gids, the same number) from [uid_base, uid_base + UID_RANGE)."""

_uid_lock = threading.Lock()
_reserved: set[int] = set()


@contextlib.contextmanager
def vmm_uid(uid_base: int) -> Iterator[int]:
    """A uid in [uid_base, uid_base + UID_RANGE) that no running VMM of ours has and no other boot
    of this process holds; held until the caller's QEMU runs (then the scan of running VMMs sees it).

    Raises:
        HypervisorError: no free uid found.
    """
    with _uid_lock:
        taken = uids_in_use(uid_base, uid_base + UID_RANGE) | _reserved
        uid = next((u for _ in range(64) if (u := uid_base + secrets.randbelow(UID_RANGE)) not in taken), None)
        if uid is None:
            raise HypervisorError("no free uid for the VMM (64 tries)")
        _reserved.add(uid)
    try:
        yield uid
    finally:
        with _uid_lock:
            _reserved.discard(uid)


def kvm_group() -> int:
    """The group that may use /dev/kvm (QEMU joins it).

    Raises:
        HypervisorError: /dev/kvm is missing, or no group but root's may read and write it.
    """
    try:
        st = os.stat("/dev/kvm")
    except OSError as e:
        raise HypervisorError(f"cannot use /dev/kvm: {e.strerror}") from None
    if st.st_gid == 0 or st.st_mode & 0o060 != 0o060:
        raise HypervisorError(
            f"/dev/kvm (group {st.st_gid}, mode {st.st_mode & 0o777:o}) is not usable by a group: "
            "a jailed QEMU needs it read-write for a group of its own (e.g. 'kvm', mode 0660)"
        )
    return st.st_gid

"""Container root filesystems from the disks the host attaches (``pb.Rootfs``).

Each image layer is an erofs disk, mounted read-only once per guest at ``LAYERS_DIR/<target>-<dev>`` and
shared by every container of the pod that uses it (counted); a container's writable layer is an
ext4 disk of its own (a 1 MiB tmpfs for a read-only rootfs, which crun makes read-only once its
mount points are made), mounted at ``ROOTFS_DIR/<id>/rw``; the overlay of both is the container's
rootfs at ``ROOTFS_DIR/<id>/rootfs``. Disks are found by SCSI target in sysfs (the guest has no
udev); the host adds them a moment before it asks, so the agent waits a little for each.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from kvmsandbox.agent.guest.errors import AgentFault, InvalidArgument
from kvmsandbox.agent.linux import MNT_DETACH, MS_NODEV, MS_RDONLY, mount, umount
from kvmsandbox.agent.v1 import agent_pb2 as pb

LAYERS_DIR = Path("/run/kvmsandbox/l")
ROOTFS_DIR = Path("/run/kvmsandbox/rootfs")
SCSI_DEVICES = Path("/sys/bus/scsi/devices")
DEVICE_WAIT_SECONDS = 10.0
MAX_TARGET = 254
# ext4 over a disk the host made with uninitialised inode tables: nothing for the guest to zero.
# discard: what a container deletes is freed in the host's file too (its usage shrinks).
EXT4_OPTIONS = "noinit_itable,discard"
# Readahead of image layer disks. The default (128 KiB) makes a container at its memory limit
# thrash instead of meeting the OOM killer: every refault of its binaries reads 128 KiB into page
# cache charged to its cgroup, which evicts more of them (a 32 MiB memory hog spun for minutes).
READAHEAD_KB = 16
READONLY_UPPER_OPTIONS = "size=1m,nr_inodes=1024,mode=0755"


def rootfs_path(container_id: str) -> Path:
    """Where a container's rootfs is assembled (the host puts this path in the spec)."""
    return ROOTFS_DIR / container_id / "rootfs"


def find_disk(target: int, timeout: float = DEVICE_WAIT_SECONDS) -> Path:
    """The block device node of the SCSI disk at ``target`` (LUN 0), waiting up to ``timeout`` s.

    Raises:
        AgentFault: no such disk appeared.
    """
    deadline = time.monotonic() + timeout
    while True:
        for host in SCSI_DEVICES.glob(f"*:0:{target}:0"):
            names = list((host / "block").glob("*")) if (host / "block").is_dir() else []
            if names and Path("/dev", names[0].name).exists():
                return Path("/dev", names[0].name)
        if time.monotonic() > deadline:
            raise AgentFault(f"no disk at SCSI target {target} after {timeout:.0f} s")
        time.sleep(0.01)


def _check_targets(rootfs: pb.Rootfs) -> None:
    targets = [*rootfs.layer_targets, *([rootfs.writable_target] if rootfs.writable_target else [])]
    if not rootfs.layer_targets:
        raise InvalidArgument("a container rootfs needs at least one image layer")
    if any(not 1 <= t <= MAX_TARGET for t in targets) or len(set(targets)) != len(targets):
        raise InvalidArgument(f"disk targets must be distinct and within 1-{MAX_TARGET}, got {targets}")


class RootfsMounts:
    """The layers mounted in this guest (with how many containers use each) and every container's
    rootfs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Layer mounts by "<target>-<major>_<minor>": the host reuses targets, so a disk is known by
        # the device now at its target, never by the target alone (a mount of a disk the host took
        # away is never handed to a new container).
        self._layer_users: dict[str, int] = {}
        self._containers: dict[str, list[str]] = {}

    def mount(self, container_id: str, rootfs: pb.Rootfs) -> Path:
        """Mounts the layers (those not mounted yet) and the writable layer, and the container's
        rootfs over them; returns its path. On failure nothing of the container stays mounted.

        Raises:
            InvalidArgument: bad targets. AgentFault: a disk did not appear or did not mount.
        """
        _check_targets(rootfs)
        with self._lock:
            if container_id in self._containers:
                raise InvalidArgument(f"container {container_id} has a rootfs already")
            self._containers[container_id] = []
        try:
            lowers = ":".join(str(self._acquire_layer(container_id, t)) for t in rootfs.layer_targets)
            return self._mount_rootfs(container_id, lowers, rootfs.writable_target)
        except BaseException:
            self.unmount(container_id)
            raise

    def _acquire_layer(self, container_id: str, target: int) -> Path:
        device = find_disk(target)
        try:
            rdev = os.stat(device).st_rdev
        except OSError as e:
            raise AgentFault(f"disk {device} at SCSI target {target} went away: {e.strerror}") from None
        key = f"{target}-{os.major(rdev)}_{os.minor(rdev)}"
        where = LAYERS_DIR / key
        with self._lock:
            users = self._layer_users.get(key, 0)
            if users == 0:
                where.mkdir(parents=True, exist_ok=True)
                _set_readahead(device)
                _mount(str(device), str(where), "erofs", MS_RDONLY | MS_NODEV)
            self._layer_users[key] = users + 1
            self._containers[container_id].append(key)
        return where

    def _mount_rootfs(self, container_id: str, lowers: str, writable: int) -> Path:
        top = ROOTFS_DIR / container_id
        root = top / "rootfs"
        root.mkdir(parents=True, exist_ok=True)
        rw = top / "rw"
        rw.mkdir(exist_ok=True)
        if writable:
            _mount(str(find_disk(writable)), str(rw), "ext4", MS_NODEV, EXT4_OPTIONS)
        else:
            # A read-only rootfs still needs its mount points made (crun makes them, then makes the
            # root read-only): a small tmpfs in guest memory, no disk.
            _mount("tmpfs", str(rw), "tmpfs", MS_NODEV, READONLY_UPPER_OPTIONS)
        for d in ("upper", "work"):
            (rw / d).mkdir(exist_ok=True)
        _mount("overlay", str(root), "overlay", 0, f"lowerdir={lowers},upperdir={rw}/upper,workdir={rw}/work")
        return root

    def unmount(self, container_id: str) -> None:
        """Unmounts the container's rootfs and writable layer, and the layers no other container
        uses (lazily: a process may still hold a file). Idempotent."""
        top = ROOTFS_DIR / container_id
        for where in (top / "rootfs", top / "rw"):
            with contextlib.suppress(OSError):
                umount(str(where), MNT_DETACH)
        with contextlib.suppress(OSError):
            for name in ("rootfs", "rw"):
                with contextlib.suppress(OSError):
                    os.rmdir(top / name)
            os.rmdir(top)
        with self._lock:
            for key in self._containers.pop(container_id, []):
                users = self._layer_users.get(key, 0) - 1
                if users > 0:
                    self._layer_users[key] = users
                    continue
                self._layer_users.pop(key, None)
                with contextlib.suppress(OSError):
                    umount(str(LAYERS_DIR / key), MNT_DETACH)
                with contextlib.suppress(OSError):
                    os.rmdir(LAYERS_DIR / key)


def _set_readahead(device: Path) -> None:
    """Sets the disk's readahead (READAHEAD_KB); a kernel without the knob keeps its own."""
    with contextlib.suppress(OSError):
        Path(f"/sys/block/{device.name}/queue/read_ahead_kb").write_text(f"{READAHEAD_KB}\n")


def _mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    try:
        mount(source, target, fstype, flags, data)
    except OSError as e:
        raise AgentFault(str(e.strerror or e)) from None

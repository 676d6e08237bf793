"""Disks added to a running VM: container image layers and writable layers.

Every VM has one virtio-scsi controller (``SCSI_CONTROLLER_ID``); a disk is a ``scsi-hd`` on it at
SCSI target ``target``, LUN 0, which also names it on both backends. SCSI hotplug reaches the guest
in about a tenth of a second under TCG (a virtio-blk on a PCIe root port takes seconds: pciehp's
presence-detect delay) and removal needs no guest cooperation (the device goes at once), so a
guest cannot hold a disk the host wants back. Pure descriptions here; the backends send them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsandbox.errors import InvalidArgument

SCSI_CONTROLLER_ID = "scsi0"
# Targets 1-254 carry disks (0 stays free; the guest scans 0-255 on a controller with max_target 255).
MIN_TARGET = 1
MAX_TARGET = 254


@dataclass(frozen=True)
class Disk:
    """A raw image file the VM gets as a SCSI disk at ``target``."""

    target: int
    path: Path
    readonly: bool

    def __post_init__(self) -> None:
        """Raises InvalidArgument for a target out of range or a relative path."""
        if not MIN_TARGET <= self.target <= MAX_TARGET:
            raise InvalidArgument(f"disk target {self.target} is outside {MIN_TARGET}-{MAX_TARGET}")
        if not self.path.is_absolute():
            raise InvalidArgument(f"disk image {self.path} must be an absolute path")


def device_id(target: int) -> str:
    """QEMU's id of the disk's scsi-hd device (libvirt: its alias without the "ua-" prefix)."""
    return f"disk-{target}"


def libvirt_alias(target: int) -> str:
    """The alias of a disk an earlier release attached through libvirt's attach-device (libvirt
    keeps user aliases only with the "ua-" prefix); disks are now added over QMP as on the qemu
    backend (libvirt_qmp.py)."""
    return f"ua-{device_id(target)}"


def qmp_attach(disk: Disk, fdset: int) -> list[dict[str, Any]]:
    """QMP commands that attach ``disk`` once its opened file is in fd set ``fdset`` (``add-fd``):
    QEMU never opens the path itself. Raises nothing."""
    node = device_id(disk.target)
    return [
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "file",
                "node-name": f"{node}-file",
                "filename": f"/dev/fdset/{fdset}",
                "read-only": disk.readonly,
                # Blocks the guest frees are freed in the file too (its usage can shrink).
                "discard": "unmap",
            },
        },
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "raw",
                "node-name": node,
                "file": f"{node}-file",
                "read-only": disk.readonly,
                "discard": "unmap",
            },
        },
        {
            "execute": "device_add",
            "arguments": {
                "driver": "scsi-hd",
                "id": node,
                "bus": f"{SCSI_CONTROLLER_ID}.0",
                "channel": 0,
                "scsi-id": disk.target,
                "lun": 0,
                "drive": node,
                "werror": "report",
                "rerror": "report",
            },
        },
    ]


REMOVALS = ("device_del", "blockdev-del", "remove-fd")
NOT_THERE = ("not found", "Failed to find", "Cannot find", "No fdset", "does not exist")
"""What QEMU answers when the object a removal names is not there (already removed, never made)."""


def qmp_detach(target: int, fdset: int) -> list[dict[str, Any]]:
    """QMP commands that remove the disk at ``target`` and everything attaching it made; each may
    fail with "not found" when an earlier, interrupted attach or detach got only part of the way.
    Raises nothing."""
    node = device_id(target)
    return [
        {"execute": "device_del", "arguments": {"id": node}},
        {"execute": "blockdev-del", "arguments": {"node-name": node}},
        {"execute": "blockdev-del", "arguments": {"node-name": f"{node}-file"}},
        {"execute": "remove-fd", "arguments": {"fdset-id": fdset}},
    ]

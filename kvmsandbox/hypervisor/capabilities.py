"""What a hypervisor backend can give a VM, and the runtime's choices among it.

Each backend's Capabilities are constants here rather than in the backend modules, so that they can
be read (by ``kvmsandbox doctor``, say) without importing a backend and the libraries it needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvmsandbox.errors import FailedPrecondition

VHOST_VSOCK = "/dev/vhost-vsock"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can give a VM; the sandbox manager chooses from it."""

    shared_filesystems: frozenset[str]
    """Of "virtio-9p", "virtio-fs"."""
    agent_transports: frozenset[str]
    """Of "virtio-serial", "vsock"."""
    hotplug: frozenset[str]
    """Devices that can be added to a running VM: "block", "net"."""
    snapshot_restore: bool
    """Device-state save and restore (VM templates)."""


# Both backends boot what builder.py describes: the shared dir over virtio-fs (virtiofsd, started
# by the runtime), the agent on a virtio-serial port or vsock; both hotplug SCSI disks (container
# layers); the qemu backend saves and restores device state (VM templates, hypervisor/qemu_snapshot.py).
LIBVIRT_CAPABILITIES = Capabilities(
    shared_filesystems=frozenset({"virtio-fs"}),
    agent_transports=frozenset({"virtio-serial", "vsock"}),
    hotplug=frozenset({"block"}),
    snapshot_restore=False,
)
QEMU_CAPABILITIES = Capabilities(
    shared_filesystems=frozenset({"virtio-fs"}),
    agent_transports=frozenset({"virtio-serial", "vsock"}),
    hotplug=frozenset({"block"}),
    snapshot_restore=True,
)


def vhost_vsock_usable() -> bool:
    """True when this process may open the host's /dev/vhost-vsock for reading and writing. Raises nothing."""
    return os.access(VHOST_VSOCK, os.R_OK | os.W_OK)


def choose_transport(configured: str, caps: Capabilities, vsock_usable: bool | None = None) -> str:
    """The agent transport for new sandboxes: `configured` ("auto", "vsock" or "virtio-serial").

    "auto" gives vsock where the backend offers it and the host has a usable /dev/vhost-vsock
    (`vsock_usable`, looked up when None), else virtio-serial.
    Raises FailedPrecondition, naming the backend's transports, when the explicit choice is not one
    the backend offers, or when "auto" finds neither.
    """
    if configured == "auto":
        if "vsock" in caps.agent_transports and (vhost_vsock_usable() if vsock_usable is None else vsock_usable):
            return "vsock"
        if "virtio-serial" in caps.agent_transports:
            return "virtio-serial"
        raise FailedPrecondition(
            f"agent transport 'auto' needs virtio-serial, or vsock with a usable {VHOST_VSOCK}; "
            f"the hypervisor backend offers: {_listed(caps.agent_transports)}"
        )
    if configured not in caps.agent_transports:
        raise FailedPrecondition(
            f"agent transport {configured!r} is not offered by the hypervisor backend "
            f"(it offers: {_listed(caps.agent_transports)})"
        )
    return configured


def choose_shared_filesystem(caps: Capabilities, supported: tuple[str, ...] = ("virtio-fs",)) -> str:
    """The first of `supported` (what the runtime can drive, in order of preference) the backend offers.

    Raises FailedPrecondition, naming both sides, when the backend offers none of them.
    """
    for fs in supported:
        if fs in caps.shared_filesystems:
            return fs
    raise FailedPrecondition(
        f"the hypervisor backend offers no shared filesystem the runtime can use "
        f"(it offers: {_listed(caps.shared_filesystems)}; the runtime uses: {', '.join(supported) or 'none'})"
    )


def _listed(names: frozenset[str]) -> str:
    return ", ".join(sorted(names)) or "none"

"""What a VM is made of (VMSpec), what a backend reports about it (VMInfo), and the backend interface.

Both backends boot the same VMSpec into the same virtual hardware; builder.py turns a spec into
libvirt domain XML or a QEMU command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.hypervisor.accel import Accel
from kvmsandbox.hypervisor.capabilities import Capabilities
from kvmsandbox.hypervisor.disks import Disk

AGENT_PORT_NAME = "org.kvmsandbox.agent.0"
"""Name of the guest's virtio-serial port for the agent (guest: /sys/class/virtio-ports/*/name)."""

AGENT_VSOCK_PORT = 1024
"""AF_VSOCK port the agent listens on where vsock exists (as Kata)."""

SHARED_DIR_TAG = "kvmshared"
"""virtio-fs tag of the pod's shared dir (served by virtiofsd on VMSpec.shared_fs_socket)."""

QMP_SOCKET_NAME = "qmp.sock"
"""File name of the qemu backend's QMP socket inside VMSpec.run_dir."""

# sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_MEMORY_MIB = 64


@dataclass(frozen=True)
class Nic:
    """A virtio-net NIC backed by an existing tap device on the host, opened by name when QEMU starts
    (the runtime may move the tap into the pod's network namespace afterwards; QEMU keeps its fd)."""

    tap: str
    mac: str
    mtu: int = 0

    def __post_init__(self) -> None:
        """Raises InvalidArgument for an unusable tap name or MAC."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.tap):
            raise InvalidArgument(f"tap device name {self.tap!r} must be 1-15 letters, digits, '_', '.', '-'")
        if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", self.mac):
            raise InvalidArgument(f"MAC address {self.mac!r} must be six lower-case hex pairs separated by ':'")
        if self.mtu and not 68 <= self.mtu <= 65535:
            raise InvalidArgument(f"MTU {self.mtu} is outside 68-65535")


@dataclass(frozen=True)
class AgentChannel:
    """How the host reaches the in-guest agent.

    virtio-serial: `socket_path` is the unix socket QEMU listens on; the host connects to it.
    vsock: `guest_cid` is the guest's context id; the host connects to (guest_cid, AGENT_VSOCK_PORT).
    """

    transport: Literal["virtio-serial", "vsock"]
    socket_path: Path | None = None
    guest_cid: int | None = None

    def __post_init__(self) -> None:
        """Raises InvalidArgument when the fields do not fit the transport."""
        if self.transport == "virtio-serial":
            if self.socket_path is None or self.guest_cid is not None:
                raise InvalidArgument("a virtio-serial agent channel needs socket_path and no guest_cid")
            _check_socket_path(self.socket_path, "agent socket_path")
        elif self.transport == "vsock":
            if self.guest_cid is None or self.socket_path is not None:
                raise InvalidArgument("a vsock agent channel needs guest_cid and no socket_path")
            # 0-2 are reserved (hypervisor, local, host); the CID is a 32-bit field with -1 reserved.
            if not 3 <= self.guest_cid < 0xFFFFFFFF:
                raise InvalidArgument(f"guest_cid {self.guest_cid} is outside 3..4294967294")
        else:
            raise InvalidArgument(f"unknown agent transport {self.transport!r}")


TEMPLATE_NIC_MAC = "02:6b:76:73:00:01"
"""The MAC of a template's NIC: every clone starts with it, and its agent gives the NIC the pod's."""


@dataclass(frozen=True)
class TemplateRole:
    """A VM that is a template (``build``: its RAM is written to ``memory_fd``, shared, and its
    device state saved with ``save_state``) or a clone of one (``clone``: ``memory_fd`` mapped
    private, so the clone's writes are its own, and the device state read from ``state_fd``, an
    fd of the runtime's reopened for each clone).

    ``memory_fd`` is an fd of the runtime's (a memfd, sealed against writes for clones); QEMU
    inherits a copy. A template VM has the devices every clone has: no shared filesystem (its
    daemon would need the clone's RAM shared), an unconnected NIC at TEMPLATE_NIC_MAC, vmgenid.
    """

    role: Literal["build", "clone"]
    memory_fd: int
    state_fd: int | None = None


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to boot one guest. All paths are absolute; the caller creates run_dir."""

    name: str
    vcpus: int
    memory_mib: int
    accel: Accel
    kernel: Path
    initrd: Path
    cmdline: str
    root_disk: Path
    """Read-only raw image, attached as the first virtio-blk disk (guest /dev/vda)."""
    shared_fs_socket: Path | None
    """vhost-user socket of the virtiofsd serving the pod's shared dir (virtio-fs, tag
    SHARED_DIR_TAG); with it the guest's RAM is a shared memfd, which virtiofsd maps."""
    agent: AgentChannel | None
    """None for the bare-boot benchmark."""
    console_log: Path
    """The guest's ttyS0 is appended to this file."""
    run_dir: Path
    """Per-VM directory for sockets; short, because unix socket paths must fit in 107 bytes."""
    tb_cache_mib: int = 128
    """TCG translation cache cap; QEMU's default of 1 GiB inflates each VM's RSS."""
    nic: Nic | None = None
    """The pod's network interface; None: the guest has only loopback."""
    cgroup_procs: tuple[Path, ...] = ()
    """``cgroup.procs`` files of the host cgroup the VMM is accounted in. Recent kernels no longer
    move memory charges with a process, so the VMM joins the cgroup before it touches memory."""
    template: TemplateRole | None = None
    """A template VM or a clone of one (qemu backend); None: a cold boot."""

    def __post_init__(self) -> None:
        """Raises InvalidArgument when a field is out of range or a path is unusable."""
        if not _NAME_RE.fullmatch(self.name):
            raise InvalidArgument(
                f"VM name {self.name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                "and start with a letter or digit"
            )
        if self.vcpus < 1:
            raise InvalidArgument(f"VM {self.name}: vcpus must be at least 1, got {self.vcpus}")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise InvalidArgument(
                f"VM {self.name}: memory_mib must be at least {MIN_MEMORY_MIB}, got {self.memory_mib}"
            )
        if self.accel not in ("kvm", "tcg"):
            raise InvalidArgument(f"VM {self.name}: unknown accel {self.accel!r}")
        if self.tb_cache_mib < 1:
            raise InvalidArgument(f"VM {self.name}: tb_cache_mib must be at least 1")
        paths = {
            "kernel": self.kernel,
            "initrd": self.initrd,
            "root_disk": self.root_disk,
            "console_log": self.console_log,
            "run_dir": self.run_dir,
        }
        if self.shared_fs_socket is not None:
            _check_socket_path(self.shared_fs_socket, f"VM {self.name}: shared_fs_socket")
        for field, path in paths.items():
            # QEMU runs with / as its working directory, so a relative path would change meaning.
            if not path.is_absolute():
                raise InvalidArgument(f"VM {self.name}: {field} must be an absolute path, got {path}")
        _check_socket_path(self.run_dir / QMP_SOCKET_NAME, f"VM {self.name}: run_dir")
        if self.template is not None:
            if self.shared_fs_socket is not None:
                # vhost-user maps guest RAM through its fd: a clone's private pages are not there.
                raise InvalidArgument(f"VM {self.name}: a template or clone cannot have a shared filesystem")
            if self.agent is not None and self.agent.transport != "virtio-serial":
                raise InvalidArgument(f"VM {self.name}: a template or clone reaches its agent over virtio-serial")
            if self.template.role == "clone" and self.template.state_fd is None:
                raise InvalidArgument(f"VM {self.name}: a clone needs its template's state_fd")


@dataclass(frozen=True)
class VMInfo:
    """What a backend knows about one VM. `pid` is QEMU's pid while it runs, else None."""

    name: str
    pid: int | None
    running: bool


class Hypervisor(Protocol):
    """A way to run VMs. Implementations: LibvirtHypervisor ("libvirt") and QemuHypervisor ("qemu")."""

    name: str

    @property
    def capabilities(self) -> Capabilities:
        """What this backend can give a VM (shared filesystems, agent transports, hotplug, snapshots);
        the same for every instance of a backend. Raises nothing."""
        ...

    def boot(self, spec: VMSpec) -> VMInfo:
        """Start QEMU for `spec` and return once it runs (not when the guest is ready).

        Raises HypervisorError with the VMM's own message, e.g. when a VM of that name runs already.
        """
        ...

    def destroy(self, name: str) -> None:
        """Stop the VM and wait until its QEMU process is gone. No error when there is no such VM.

        Raises HypervisorError when QEMU cannot be stopped.
        """
        ...

    def list(self) -> list[VMInfo]:
        """The VMs of this backend, including ones booted before our process restarted.

        A VM whose QEMU exited on its own is reported with running=False (qemu backend) or no longer
        at all (libvirt forgets transient domains); destroy() cleans up after both.
        Raises HypervisorError when the backend cannot be asked.
        """
        ...

    def info(self, name: str) -> VMInfo | None:
        """One VM as list() would report it, or None.

        Raises HypervisorError when the backend cannot be asked.
        """
        ...

    def attach_disk(self, name: str, disk: Disk) -> None:
        """Add ``disk`` to the running VM ``name`` as a SCSI disk at ``disk.target``.

        Raises HypervisorError with the VMM's message.
        """
        ...

    def detach_disk(self, name: str, target: int) -> None:
        """Remove the disk at ``target`` from the VM; no error when there is none.

        Raises HypervisorError with the VMM's message.
        """
        ...

    def vmm_logs(self, name: str) -> tuple[Path, ...]:
        """Files the VM's QEMU appends to at will (its stderr) that the runtime must keep bounded
        (the console sweeper trims them); none where the backend bounds them itself. Raises nothing."""
        ...

    def close(self) -> None:
        """Release the backend's connections; running VMs keep running."""
        ...


def _check_socket_path(path: Path, what: str) -> None:
    if not path.is_absolute():
        raise InvalidArgument(f"{what} must be an absolute path, got {path}")
    if len(str(path).encode()) > UNIX_PATH_MAX:
        raise InvalidArgument(f"{what} {path} is too long for a unix socket (limit {UNIX_PATH_MAX} bytes)")

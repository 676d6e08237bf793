"""The duties of PID 1 that the initramfs left to the agent: the remaining virtual filesystems,
cgroup v2 with its controllers delegated, the loopback interface, and powering off."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
from pathlib import Path

from kvmsandbox.agent.guest import log
from kvmsandbox.agent.linux import mount

MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# (source, target, fstype, flags, data): what a container runtime host needs beyond /proc, /sys, /dev.
MOUNTS = [
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
    ("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, "nsdelegate"),
]


def _is_mounted(target: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mount_filesystems() -> None:
    """Mounts whatever of MOUNTS is not mounted yet; raises OSError on failure."""
    for source, target, fstype, flags, data in MOUNTS:
        if os.path.exists("/proc/self/mounts") and _is_mounted(target):
            continue
        Path(target).mkdir(parents=True, exist_ok=True)
        mount(source, target, fstype, flags, data)


def delegate_cgroup_controllers(root: Path = Path("/sys/fs/cgroup")) -> list[str]:
    """Enables every available controller for child cgroups (crun puts containers there)."""
    controllers = (root / "cgroup.controllers").read_text().split()
    (root / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in controllers))
    return controllers


def loopback_up() -> None:
    """ifconfig lo up: containers share the guest's network namespace and expect a loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def setup_pid1() -> None:
    """Everything the guest needs before the agent serves requests."""
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    mount_filesystems()
    controllers = delegate_cgroup_controllers()
    loopback_up()
    log.event("init-done", cgroup_controllers=",".join(controllers))


def power_off() -> None:
    """Ends the VM; the host sees QEMU exit."""
    os.sync()
    ctypes.CDLL(None).reboot(LINUX_REBOOT_CMD_POWER_OFF)

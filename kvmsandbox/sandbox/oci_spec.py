"""Builds the OCI runtime spec (config.json) the agent hands to crun inside the guest.

Defaults follow runc's and containerd's: the usual pseudo filesystems, Docker's default
capability set, a masked /proc. Containers of one pod share the guest's network, IPC and UTS
namespaces (the VM is the pod, as the pause container's namespaces are under runc: the guest's
hostname is the pod's), and get their own mount and cgroup namespaces and, unless the pod shares
one, their own PID namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

# Every capability Linux 6.1 (the guest kernel) knows, for "ALL" and privileged containers.
ALL_CAPABILITIES = [
    f"CAP_{name}"
    for name in [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
]


@dataclass(frozen=True)
class Mount:
    """A bind mount of a guest path into the container."""

    source: str
    destination: str
    readonly: bool = False


@dataclass(frozen=True)
class Isolation:
    """What a container's security context asks of the kernel beyond its process."""

    # None: the defaults (MASKED_PATHS, READONLY_PATHS).
    masked_paths: list[str] | None = None
    readonly_paths: list[str] | None = None
    # The OCI ``linux.seccomp`` object; None: no filter.
    seccomp: dict[str, Any] | None = None
    # "": a PID namespace of its own; else the guest path of the one to join (the pod's, a target's).
    pid_namespace: str = ""
    # Privileged: /sys and the cgroup tree writable, every device allowed.
    privileged: bool = False
    # The guest path of the pod's /dev/shm to bind; "": a tmpfs of the container's own.
    shm: str = ""


@dataclass(frozen=True)
class ProcessSpec:
    args: list[str]
    env: list[str] = field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    terminal: bool = False
    # (width, height) of the terminal at start; (0, 0): the runtime's default.
    console_size: tuple[int, int] = (0, 0)
    # A stdin the runtime writes (what attached clients send); closed after the first attach
    # with stdin_once. Not part of the OCI process: how the agent starts it.
    stdin: bool = False
    stdin_once: bool = False
    # None: DEFAULT_CAPABILITIES.
    capabilities: list[str] | None = None
    no_new_privileges: bool = False


def process_object(process: ProcessSpec) -> dict[str, Any]:
    """The OCI ``process`` object (also what ``crun exec --process`` takes)."""
    env = list(process.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    caps = list(DEFAULT_CAPABILITIES if process.capabilities is None else process.capabilities)
    if process.terminal and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    extra: dict[str, Any] = {}
    if process.terminal and all(process.console_size):
        extra["consoleSize"] = {"width": process.console_size[0], "height": process.console_size[1]}
    return {
        **extra,
        "terminal": process.terminal,
        "user": {
            "uid": process.uid,
            "gid": process.gid,
            **({"additionalGids": process.additional_gids} if process.additional_gids else {}),
        },
        "args": list(process.args),
        "env": env,
        "cwd": process.cwd or "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576}],
        "noNewPrivileges": process.no_new_privileges,
    }


def container_spec(
    *,
    root_path: str,
    process: ProcessSpec,
    readonly_rootfs: bool = False,
    mounts: list[Mount] | None = None,
    cgroups_path: str = "",
    resources: dict[str, Any] | None = None,
    isolation: Isolation | None = None,
) -> dict[str, Any]:
    """A complete OCI runtime spec for a container whose rootfs is at ``root_path`` in the guest."""
    iso = isolation or Isolation()
    pid: dict[str, Any] = {"type": "pid", **({"path": iso.pid_namespace} if iso.pid_namespace else {})}
    linux: dict[str, Any] = {
        "namespaces": [pid, {"type": "mount"}, {"type": "cgroup"}],
        "maskedPaths": MASKED_PATHS if iso.masked_paths is None else iso.masked_paths,
        "readonlyPaths": READONLY_PATHS if iso.readonly_paths is None else iso.readonly_paths,
    }
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    resources = dict(resources or {})
    if iso.privileged:
        resources["devices"] = [{"allow": True, "access": "rwm"}]
    if resources:
        linux["resources"] = resources
    if iso.seccomp is not None:
        linux["seccomp"] = iso.seccomp
    return {
        "ociVersion": OCI_VERSION,
        "process": process_object(process),
        "root": {"path": root_path, "readonly": readonly_rootfs},
        "mounts": _pseudo_filesystems(iso.privileged, iso.shm) + [_bind_mount(m) for m in mounts or []],
        "linux": linux,
    }


def _bind_mount(mount: Mount) -> dict[str, Any]:
    return {
        "destination": mount.destination,
        "type": "bind",
        "source": mount.source,
        "options": ["rbind", "rprivate", "ro" if mount.readonly else "rw"],
    }


def _pseudo_filesystems(writable_sys: bool = False, shm: str = "") -> list[dict[str, Any]]:
    """The mounts every container gets, as runc's and containerd's default spec has them (a
    privileged container's /sys and cgroup tree writable, as containerd makes them; the pod's
    /dev/shm when there is one)."""
    ro = [] if writable_sys else ["ro"]
    dev_shm: dict[str, Any] = {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    }
    if shm:
        dev_shm = {
            "destination": "/dev/shm",
            "type": "bind",
            "source": shm,
            "options": ["rbind", "nosuid", "noexec", "nodev"],
        }
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        dev_shm,
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", *ro],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", *ro],
        },
    ]

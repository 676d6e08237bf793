"""Plain values that cross the sandbox layer's boundary: what callers ask for (DNS, network, host
mounts) and what they get back (exec results, container stats, boot timings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvmsandbox.network.cni import PortMapping

__all__ = [
    "BootTimings",
    "ContainerStats",
    "DnsConfig",
    "ExecResult",
    "FilesystemUsage",
    "HostMount",
    "NetworkRequest",
    "PortMapping",
    "VmUsage",
]


@dataclass(frozen=True)
class PodKernel:
    """Pod-wide kernel settings in the guest: sysctls, and whether containers that ask for it share
    one process namespace (with a pause process as its PID 1)."""

    sysctls: tuple[tuple[str, str], ...] = ()
    share_pid_namespace: bool = False


@dataclass(frozen=True)
class DnsConfig:
    """The pod's resolv.conf."""

    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkRequest:
    """What a pod asks of its network: port mappings (CNI portmap) and CNI_ARGS (pod name...)."""

    port_mappings: list[PortMapping] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HostMount:
    """A host file or directory made visible at ``container_path`` in a container."""

    host_path: Path
    container_path: str
    readonly: bool = False
    # Read-only all the way down (the mounts below the host path too); else only the path's own.
    recursive_readonly: bool = False
    # Mounts the host makes below the path later appear in the container ("rslave"), or not
    # ("rprivate"). Nothing made in the guest can appear on the host: "rshared" is refused.
    host_to_container: bool = False


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class ContainerStats:
    """A running container's cgroup figures, as its guest reports them."""

    timestamp_ns: int
    cpu_usage_ns: int
    memory_working_set_bytes: int
    memory_usage_bytes: int
    memory_rss_bytes: int
    memory_limit_bytes: int
    pids: int


@dataclass(frozen=True)
class FilesystemUsage:
    """A container's writable layer, measured on the host."""

    mountpoint: str
    used_bytes: int
    inodes_used: int


@dataclass(frozen=True)
class VmUsage:
    """A running pod's host-side figures: everything its VM uses, containers included."""

    timestamp_ns: int
    cpu_usage_ns: int
    memory_usage_bytes: int
    memory_working_set_bytes: int
    # "cgroup <path>" or "process <pid>".
    source: str


@dataclass
class BootTimings:
    """Seconds from the create request to the end of each boot phase."""

    host_prepared: float = 0.0
    vmm_placed: float = 0.0
    vmm_started: float = 0.0
    agent_ready: float = 0.0
    sandbox_ready: float = 0.0

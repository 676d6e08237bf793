"""What the runtime keeps about each sandbox and its containers, typed, with the JSON form it is
stored in. Records written by the previous release (schema 0: states as strings, CRI facts in an
``extra`` dict, the network as a dict) load too; the CRI facts are the CRI layer's to migrate."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.network.pod import PodNetwork
from kvmsandbox.sandbox.states import ContainerState, SandboxState

SCHEMA = 1
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    """Returns ``value`` if it is usable as a sandbox or container id (it becomes a path part).

    Raises:
        InvalidArgument: empty, too long, or with characters outside [A-Za-z0-9_.-].
    """
    if not ID_PATTERN.match(value):
        raise InvalidArgument(f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.', '-'")
    return value


@dataclass
class ContainerRecord:
    id: str
    sandbox_id: str
    name: str
    state: ContainerState
    args: list[str]
    lower_dirs: list[str]
    log_path: str = ""
    pid: int = 0
    exit_code: int | None = None
    created_at_ns: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    oom_killed: bool = False
    # Why it ended when nobody saw it end ("sandbox stopped", "container lost by the guest").
    reason: str = ""
    # The host mounts made for it (host paths; the rootfs too on the "share" path), by id: how
    # they are found and detached.
    mount_ids: list[int] = field(default_factory=list)
    # Its rootfs as disks: the image layers it uses (keys of SandboxRecord.layer_disks, top first),
    # its writable layer's SCSI target (0: none) and what that file held when it was made.
    layer_keys: list[str] = field(default_factory=list)
    writable_target: int = 0
    writable_baseline_bytes: int = 0
    # Its process has a terminal; a stdin the host writes (attach); closed after the first attach.
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False
    # What an exec in it runs as (ProcessSpec fields: env, cwd, uid, gid, additional_gids), as
    # containerd takes an exec's user, environment and directory from the container's process.
    exec_base: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerRecord:
        data = dict(data)
        legacy = data.pop("extra", None) or {}
        data.pop("labels", None)
        if legacy:
            data.setdefault("oom_killed", bool(legacy.get("oom_killed", False)))
            data.setdefault("reason", str(legacy.get("reason", "")))
        data["state"] = ContainerState(data["state"])
        return cls(**_known(cls, data))


@dataclass
class SandboxRecord:
    id: str
    vm_name: str
    backend: str
    accel: str
    transport: str  # "virtio-serial" or "vsock"
    vcpus: int
    memory_mib: int
    hostname: str
    state: SandboxState
    agent_socket: str = ""
    guest_cid: int = 0
    shared_fs: str = "virtio-9p"  # "none": a clone of a VM template (no shared filesystem)
    # The VM template the VM was cloned from ("": booted cold); warm: it waited in the warm pool.
    template: str = ""
    warm: bool = False
    created_at_ns: int = 0
    stopped_at_ns: int = 0
    # Why the sandbox is BROKEN.
    broken_reason: str = ""
    guest_files: dict[str, str] = field(default_factory=dict)
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    # The host cgroup the VMM was placed in ("" when none) and the cgroup dirs the runtime created
    # for it (removed with the VM).
    cgroup: str = ""
    cgroup_created: list[str] = field(default_factory=list)
    # The pod network: asked for (recorded before anything is made, so a teardown after any failure
    # looks for it), what was made, and whether it was released (CNI DEL done).
    network_requested: bool = False
    network: PodNetwork | None = None
    network_released: bool = False
    # The VM has the SCSI controller container disks go on (pods booted by an earlier release do
    # not: their containers keep the host overlay over 9p).
    scsi_disks: bool = False
    # Image layers attached to the VM as disks: layer key -> SCSI target.
    layer_disks: dict[str, int] = field(default_factory=dict)
    # The last SCSI target handed out: the next is the first free one after it, so a target just
    # freed is not reused at once (the guest may not have seen its disk go yet).
    last_target: int = 0
    # What the sandbox cost right after boot (kvmsandbox.sandbox.probes.memory_snapshot), bytes.
    overhead_at_boot: dict[str, int] = field(default_factory=dict)
    schema: int = SCHEMA

    @property
    def network_pending_release(self) -> bool:
        return self.network_requested and not self.network_released

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(
            state=self.state.value,
            containers={k: c.to_json() for k, c in self.containers.items()},
            network=self.network.to_json() if self.network else None,
            schema=SCHEMA,
        )
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxRecord:
        data = dict(data)
        if data.get("schema", 0) == 0:
            _migrate_schema_0(data)
        data["state"] = SandboxState(data["state"])
        data["containers"] = {k: ContainerRecord.from_json(v) for k, v in data.get("containers", {}).items()}
        data["network"] = PodNetwork.from_json(data["network"]) if data.get("network") else None
        return cls(**_known(cls, data))


def _migrate_schema_0(data: dict[str, Any]) -> None:
    """The previous release kept CRI facts in ``extra`` and ``labels`` (left to the CRI layer's
    migration, which reads the file before the runtime loads it) and the network as one dict:
    ``{}`` (none), ``{"pending": true}`` (being made) or a PodNetwork with a ``released`` flag."""
    data.pop("extra", None)
    data.pop("labels", None)
    net = data.get("network") or {}
    data["network_requested"] = bool(net)
    data["network_released"] = bool(net.get("released", False))
    data["network"] = net if "netns" in net else None


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}

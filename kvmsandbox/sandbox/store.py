"""The on-disk record of every sandbox and its containers: one JSON file per sandbox, written
atomically, so a restarted runtime finds what it was running."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmsandbox.errors import InvalidArgument, NotFound

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
    state: str  # "created", "running", "exited"
    args: list[str]
    lower_dirs: list[str]
    log_path: str = ""
    pid: int = 0
    exit_code: int | None = None
    created_at_ns: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    # Kept for the CRI layer, opaque here: metadata, annotations, image, mounts, reason...
    extra: dict[str, Any] = field(default_factory=dict)


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
    state: str  # "booting", "ready", "stopped"
    agent_socket: str = ""
    guest_cid: int = 0
    created_at_ns: int = 0
    guest_files: dict[str, str] = field(default_factory=dict)
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    stopped_at_ns: int = 0
    # The host cgroup the VMM was placed in ("" when none) and the cgroup dirs the runtime created
    # for it (removed with the VM).
    cgroup: str = ""
    cgroup_created: list[str] = field(default_factory=list)
    # The pod network (kvmsandbox.network.pod.PodNetwork.to_json()); {} for a sandbox without one.
    network: dict[str, Any] = field(default_factory=dict)
    # What the sandbox cost right after boot (kvmsandbox.overhead.measure.snapshot), bytes.
    overhead_at_boot: dict[str, int] = field(default_factory=dict)
    # Kept for the CRI layer, opaque here: metadata, annotations, log directory, handler...
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxRecord:
        containers = {k: ContainerRecord(**v) for k, v in data.pop("containers", {}).items()}
        return cls(**data, containers=containers)


class SandboxStore:
    """Sandbox records below ``root/sandboxes/<id>/``; the sandbox dir holds all its host files."""

    def __init__(self, root: Path) -> None:
        self.root = root / "sandboxes"
        self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, sandbox_id: str) -> Path:
        return self.root / check_id("sandbox id", sandbox_id)

    def save(self, record: SandboxRecord) -> None:
        """Writes the record atomically (a crash leaves the old or the new file, never half)."""
        path = self.dir(record.id) / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(record.to_json(), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, sandbox_id: str) -> SandboxRecord:
        """Raises NotFound for an unknown sandbox."""
        path = self.dir(sandbox_id) / "state.json"
        try:
            return SandboxRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFound(f"sandbox {sandbox_id} not found") from None

    def ids(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/state.json"))

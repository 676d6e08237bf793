"""What the CRI layer keeps about pods and containers beyond what the sandbox layer records:
metadata, labels, annotations, the log directory, the runtime handler, the declared overhead, the
image a container came from. Typed, indexed by id in memory, persisted atomically as one JSON file
per pod below ``<state_dir>/cri``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmsandbox.errors import NotFound
from kvmsandbox.host.beneath import private_dir
from kvmsandbox.overhead.sizing import PodResources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodMetadata:
    name: str = ""
    uid: str = ""
    namespace: str = ""
    attempt: int = 0


@dataclass(frozen=True)
class CriPod:
    id: str
    metadata: PodMetadata = PodMetadata()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_directory: str = ""
    runtime_handler: str = ""
    # How the VM was sized (a sentence per dimension).
    sizing: str = ""
    declared_overhead: PodResources = field(default_factory=PodResources)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CriPod:
        return cls(
            id=data["id"],
            metadata=PodMetadata(**_known(PodMetadata, data.get("metadata", {}))),
            labels=dict(data.get("labels", {})),
            annotations=dict(data.get("annotations", {})),
            log_directory=data.get("log_directory", ""),
            runtime_handler=data.get("runtime_handler", ""),
            sizing=data.get("sizing", ""),
            declared_overhead=PodResources(**_known(PodResources, data.get("declared_overhead", {}))),
        )


@dataclass(frozen=True)
class MountInfo:
    """A CRI mount as asked for (ContainerStatus reports it back)."""

    container_path: str
    host_path: str
    readonly: bool = False
    recursive_readonly: bool = False
    propagation: int = 0  # the CRI MountPropagation value asked for


@dataclass(frozen=True)
class CriContainer:
    id: str
    pod_id: str
    name: str = ""
    attempt: int = 0
    image: str = ""
    image_id: str = ""
    image_ref: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    mounts: tuple[MountInfo, ...] = ()
    # The image's StopSignal, as the image config spells it ("" for SIGTERM).
    stop_signal: str = ""
    # The identity of its first process (ContainerStatus.user); uid -1: not recorded (older release).
    uid: int = -1
    gid: int = 0
    supplemental_groups: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CriContainer:
        fields = _known(cls, data)
        fields["labels"] = dict(fields.get("labels", {}))
        fields["annotations"] = dict(fields.get("annotations", {}))
        fields["mounts"] = tuple(MountInfo(**_known(MountInfo, m)) for m in fields.get("mounts", ()))
        fields["supplemental_groups"] = tuple(int(g) for g in fields.get("supplemental_groups", ()))
        return cls(**fields)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields ``cls`` has (a newer release may have written more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


class CriStore:
    """Pods and their containers; readers get the stored (immutable) objects."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "cri"
        private_dir(self.root)  # pod and container configs (environment variables among them)
        self._lock = threading.Lock()
        self._pods: dict[str, CriPod] = {}
        self._containers: dict[str, CriContainer] = {}
        for path in sorted(self.root.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                pod = CriPod.from_json(data["pod"])
                containers = [CriContainer.from_json(c) for c in data.get("containers", [])]
                if pod.id != path.stem or any(c.pod_id != pod.id for c in containers):
                    raise ValueError("it names another pod than its file name")
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                log.error("CRI record %s cannot be read, skipping it: %s", path, e)
                continue
            self._pods[pod.id] = pod
            self._containers.update((c.id, c) for c in containers)

    def pod(self, pod_id: str) -> CriPod | None:
        with self._lock:
            return self._pods.get(pod_id)

    def container(self, container_id: str) -> CriContainer | None:
        with self._lock:
            return self._containers.get(container_id)

    def pod_ids(self) -> set[str]:
        with self._lock:
            return set(self._pods)

    def add_pod(self, pod: CriPod, containers: Iterable[CriContainer] = ()) -> None:
        """Stores the pod (and ``containers`` of it) in one atomic write."""
        with self._lock:
            self._pods[pod.id] = pod
            self._containers.update((c.id, c) for c in containers if c.pod_id == pod.id)
            self._write(pod.id)

    def remove_pod(self, pod_id: str) -> None:
        """Forgets the pod and its containers (idempotent)."""
        with self._lock:
            # Only ids this store made a file for name a path: a request's id never does.
            if self._pods.pop(pod_id, None) is not None:
                (self.root / f"{pod_id}.json").unlink(missing_ok=True)
            for cid in [c.id for c in self._containers.values() if c.pod_id == pod_id]:
                del self._containers[cid]

    def add_container(self, container: CriContainer) -> None:
        """Raises NotFound when its pod is not (or no longer) stored."""
        with self._lock:
            if container.pod_id not in self._pods:
                raise NotFound(f"pod sandbox {container.pod_id} not found")
            self._containers[container.id] = container
            self._write(container.pod_id)

    def remove_container(self, container_id: str) -> None:
        """Forgets the container (idempotent)."""
        with self._lock:
            c = self._containers.pop(container_id, None)
            if c is not None and c.pod_id in self._pods:
                self._write(c.pod_id)

    def retain(
        self, pod_ids: set[str], container_ids: set[str], unknown_pods: frozenset[str] | set[str] = frozenset()
    ) -> None:
        """Forgets every pod and container not named (gone while the runtime was down); the
        containers of ``unknown_pods`` (whose sandbox records cannot be read) all stay."""
        for pod_id in self.pod_ids() - pod_ids - unknown_pods:
            self.remove_pod(pod_id)
        with self._lock:
            stale = [c for c in self._containers.values() if c.id not in container_ids and c.pod_id not in unknown_pods]
            for c in stale:
                del self._containers[c.id]
            for pod_id in {c.pod_id for c in stale} & set(self._pods):
                self._write(pod_id)

    def _write(self, pod_id: str) -> None:
        """Writes the pod's file atomically (the caller holds the lock)."""
        pod = self._pods.get(pod_id) or CriPod(id=pod_id)
        data = {
            "pod": asdict(pod),
            "containers": [asdict(c) for c in self._containers.values() if c.pod_id == pod_id],
        }
        path = self.root / f"{pod_id}.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

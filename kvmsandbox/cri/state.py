"""What the CRI verbs share: the sandbox manager, the image store, the config, and the
translation of the runtime's records into CRI messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmsandbox.config import Config
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.errors import NotFound
from kvmsandbox.image import ImageStore
from kvmsandbox.overhead.node import NodeOverhead
from kvmsandbox.overhead.sizing import PodResources
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.store import ContainerRecord, SandboxRecord

SANDBOX_STATES = {"ready": cri.SANDBOX_READY, "booting": cri.SANDBOX_NOTREADY, "stopped": cri.SANDBOX_NOTREADY}
CONTAINER_STATES = {"created": cri.CONTAINER_CREATED, "running": cri.CONTAINER_RUNNING, "exited": cri.CONTAINER_EXITED}


@dataclass
class CriState:
    config: Config
    manager: SandboxManager
    images: ImageStore
    pod_cidr: str = ""
    overhead: NodeOverhead = field(init=False)

    def __post_init__(self) -> None:
        self.overhead = NodeOverhead(self.config)

    def find_container(self, container_id: str) -> tuple[SandboxRecord, ContainerRecord]:
        """The container with that id and its sandbox.

        Raises:
            NotFound: no sandbox has such a container.
        """
        for record in self.manager.list_sandboxes():
            c = record.containers.get(container_id)
            if c is not None:
                return record, c
        raise NotFound(f"container {container_id} not found")


def pod_resources(r: cri.LinuxContainerResources) -> PodResources:
    return PodResources(
        cpu_period=r.cpu_period,
        cpu_quota=r.cpu_quota,
        cpu_shares=r.cpu_shares,
        memory_limit_in_bytes=r.memory_limit_in_bytes,
    )


def labels_match(labels: dict[str, str], selector: Any) -> bool:
    """True when every key=value of a CRI label selector is in ``labels``."""
    return all(labels.get(k) == v for k, v in selector.items())


def sandbox_metadata(record: SandboxRecord) -> cri.PodSandboxMetadata:
    md = record.extra.get("metadata", {})
    return cri.PodSandboxMetadata(
        name=md.get("name", ""), uid=md.get("uid", ""), namespace=md.get("namespace", ""), attempt=md.get("attempt", 0)
    )


def container_metadata(c: ContainerRecord) -> cri.ContainerMetadata:
    md = c.extra.get("metadata", {})
    return cri.ContainerMetadata(name=md.get("name", c.name), attempt=md.get("attempt", 0))


def pod_sandbox(record: SandboxRecord) -> cri.PodSandbox:
    return cri.PodSandbox(
        id=record.id,
        metadata=sandbox_metadata(record),
        state=SANDBOX_STATES[record.state],
        created_at=record.created_at_ns,
        labels=record.labels,
        annotations=record.extra.get("annotations", {}),
        runtime_handler=record.extra.get("runtime_handler", ""),
    )


def container(c: ContainerRecord) -> cri.Container:
    return cri.Container(
        id=c.id,
        pod_sandbox_id=c.sandbox_id,
        metadata=container_metadata(c),
        image=cri.ImageSpec(image=c.extra.get("image", "")),
        image_ref=c.extra.get("image_ref", ""),
        image_id=c.extra.get("image_id", ""),
        state=CONTAINER_STATES[c.state],
        created_at=c.created_at_ns,
        labels=c.labels,
        annotations=c.extra.get("annotations", {}),
    )


def exit_reason(c: ContainerRecord) -> str:
    """Completed, Error or OOMKilled, as kubelet shows them; empty while the container runs."""
    if c.state != "exited":
        return ""
    if c.extra.get("oom_killed"):
        return "OOMKilled"
    return "Completed" if c.exit_code == 0 else "Error"


def container_status(c: ContainerRecord) -> cri.ContainerStatus:
    mounts = [
        cri.Mount(container_path=m["container_path"], host_path=m["host_path"], readonly=m["readonly"])
        for m in c.extra.get("mounts", [])
    ]
    return cri.ContainerStatus(
        id=c.id,
        metadata=container_metadata(c),
        state=CONTAINER_STATES[c.state],
        created_at=c.created_at_ns,
        started_at=c.started_at_ns,
        finished_at=c.finished_at_ns,
        exit_code=c.exit_code or 0,
        image=cri.ImageSpec(image=c.extra.get("image", "")),
        image_ref=c.extra.get("image_ref", ""),
        image_id=c.extra.get("image_id", ""),
        reason=exit_reason(c) or c.extra.get("reason", ""),
        message=c.extra.get("message", ""),
        labels=c.labels,
        annotations=c.extra.get("annotations", {}),
        mounts=mounts,
        log_path=c.log_path,
    )

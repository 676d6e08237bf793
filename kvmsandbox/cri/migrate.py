"""Records of the previous release (sandbox state schema 0) kept the CRI facts inside each sandbox's
record (an ``extra`` dict and ``labels``, per sandbox and per container). At start, before anything
rewrites those records, the facts move into the CRI store; the sandbox layer hands them over as it
read them (``SandboxManager.schema0_cri_facts``)."""

from __future__ import annotations

import logging
from typing import Any

from kvmsandbox.cri.store import CriContainer, CriPod, CriStore, MountInfo, PodMetadata
from kvmsandbox.overhead.sizing import PodResources

log = logging.getLogger(__name__)


def migrate_schema_0(facts: dict[str, dict[str, Any]], store: CriStore) -> list[str]:
    """Stores the CRI facts of every schema-0 sandbox (pods the store has already are left alone);
    returns the ids migrated. Facts that do not parse are skipped, with a warning: the pod stays,
    with empty metadata."""
    migrated = []
    for pod_id, data in sorted(facts.items()):
        if store.pod(pod_id) is not None:
            continue
        try:
            pod, containers = _from_schema_0(pod_id, data)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            log.warning("cannot migrate the CRI facts of sandbox %s: %s", pod_id, e)
            continue
        store.add_pod(pod, containers)
        migrated.append(pod.id)
        log.info("migrated the CRI facts of sandbox %s from its schema-0 record", pod.id)
    return migrated


def _from_schema_0(pod_id: str, data: dict[str, Any]) -> tuple[CriPod, list[CriContainer]]:
    extra = data["extra"]
    pod = CriPod(
        id=pod_id,
        metadata=PodMetadata(**extra.get("metadata", {})),
        labels=dict(data["labels"]),
        annotations=dict(extra.get("annotations", {})),
        log_directory=extra.get("log_directory", ""),
        runtime_handler=extra.get("runtime_handler", ""),
        sizing=extra.get("sizing", ""),
        declared_overhead=PodResources(**extra.get("declared_overhead", {})),
    )
    containers = []
    for cid, c in data["containers"].items():
        cx = c["extra"]
        md = cx.get("metadata", {})
        containers.append(
            CriContainer(
                id=cid,
                pod_id=pod.id,
                name=md.get("name", c["name"]),
                attempt=md.get("attempt", 0),
                image=cx.get("image", ""),
                image_id=cx.get("image_id", ""),
                image_ref=cx.get("image_ref", ""),
                labels=dict(c["labels"]),
                annotations=dict(cx.get("annotations", {})),
                mounts=tuple(MountInfo(**m) for m in cx.get("mounts", [])),
                stop_signal=cx.get("stop_signal", ""),
            )
        )
    return pod, containers

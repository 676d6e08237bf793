"""Records of the previous release (sandbox state schema 0) kept the CRI facts inside each sandbox's
``state.json`` (an ``extra`` dict and ``labels``, per sandbox and per container). Before the
runtime loads its sandboxes, those facts move into the CRI store; the sandbox layer drops them the
next time it saves the record."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kvmsandbox.cri.store import CriContainer, CriPod, CriStore, MountInfo, PodMetadata
from kvmsandbox.overhead.sizing import PodResources

log = logging.getLogger(__name__)


def migrate_schema_0(state_dir: Path, store: CriStore) -> list[str]:
    """Moves the CRI facts of every schema-0 sandbox record into ``store`` (pods it has already
    are left alone); returns the ids migrated. A record that cannot be read is skipped (the
    sandbox layer reports it)."""
    migrated = []
    for path in sorted((state_dir / "sandboxes").glob("*/state.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("cannot read %s to migrate it: %s", path, e)
            continue
        if not isinstance(data, dict) or data.get("schema", 0) != 0 or store.pod(str(data.get("id"))) is not None:
            continue
        try:
            pod, containers = _from_schema_0(data)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            log.warning("cannot migrate %s: %s", path, e)
            continue
        store.add_pod(pod)
        for c in containers:
            store.add_container(c)
        migrated.append(pod.id)
        log.info("migrated the CRI facts of sandbox %s from its schema-0 record", pod.id)
    return migrated


def _from_schema_0(data: dict[str, Any]) -> tuple[CriPod, list[CriContainer]]:
    extra = data.get("extra") or {}
    pod = CriPod(
        id=data["id"],
        metadata=PodMetadata(**extra.get("metadata", {})),
        labels=dict(data.get("labels") or {}),
        annotations=dict(extra.get("annotations", {})),
        log_directory=extra.get("log_directory", ""),
        runtime_handler=extra.get("runtime_handler", ""),
        sizing=extra.get("sizing", ""),
        declared_overhead=PodResources(**extra.get("declared_overhead", {})),
    )
    containers = []
    for cid, c in (data.get("containers") or {}).items():
        cx = c.get("extra") or {}
        md = cx.get("metadata", {})
        containers.append(
            CriContainer(
                id=cid,
                pod_id=pod.id,
                name=md.get("name", c.get("name", "")),
                attempt=md.get("attempt", 0),
                image=cx.get("image", ""),
                image_id=cx.get("image_id", ""),
                image_ref=cx.get("image_ref", ""),
                labels=dict(c.get("labels") or {}),
                annotations=dict(cx.get("annotations", {})),
                mounts=tuple(MountInfo(**m) for m in cx.get("mounts", [])),
                stop_signal=cx.get("stop_signal", ""),
            )
        )
    return pod, containers

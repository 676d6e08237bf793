"""The record of every sandbox and its containers: in memory, indexed by sandbox and container id,
and on disk as one JSON file per sandbox, written atomically, so a restarted runtime finds what it
was running."""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from kvmsandbox.errors import NotFound
from kvmsandbox.host.beneath import private_dir, traversable_dir
from kvmsandbox.sandbox.records import SandboxRecord, check_id

log = logging.getLogger(__name__)


class SandboxStore:
    """Sandbox records below ``root/sandboxes/<id>/``; the sandbox dir holds all its host files.

    Readers get copies: a record changes only through ``save``, as it did when each read came from
    disk, so a change abandoned half-way (an error) is never seen by anyone else.
    """

    def __init__(self, root: Path) -> None:
        self.root = root / "sandboxes"
        # The state dir itself: VMMs must pass through it to libvirt's files for them.
        traversable_dir(root)
        private_dir(self.root)
        self._lock = threading.Lock()
        self._records: dict[str, SandboxRecord] = {}
        self._container_index: dict[str, str] = {}
        # Records on disk that could not be read: sandbox id -> why. Reported, never fatal.
        self.unreadable: dict[str, str] = {}
        # What records of the previous release (schema 0) kept for the CRI layer, as they were on
        # disk: sandbox id -> {"extra", "labels", "containers": {id: {"name", "extra", "labels"}}}.
        # The sandbox layer drops these facts when it next saves the record; they wait here, in
        # memory, for the CRI layer to take them over at start.
        self.schema0_cri_facts: dict[str, dict[str, Any]] = {}
        for path in sorted(self.root.glob("*/state.json")):
            try:
                data = json.loads(path.read_text())
                record = SandboxRecord.from_json(data)
                if record.id != path.parent.name:
                    raise ValueError(f"it names sandbox {record.id!r}, not the one of its directory")
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                self.unreadable[path.parent.name] = f"{type(e).__name__}: {e}"
                log.error("sandbox record %s cannot be read, skipping it: %s", path, e)
                continue
            if data.get("schema", 0) == 0:
                self.schema0_cri_facts[record.id] = _cri_facts(data)
            self._index(record)

    def dir(self, sandbox_id: str) -> Path:
        return self.root / check_id("sandbox id", sandbox_id)

    def _index(self, record: SandboxRecord) -> None:
        old = self._records.get(record.id)
        if old is not None:
            for cid in old.containers:
                self._container_index.pop(cid, None)
        self._records[record.id] = record
        for cid in record.containers:
            self._container_index[cid] = record.id

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
        with self._lock:
            self._index(copy.deepcopy(record))

    def forget(self, sandbox_id: str) -> None:
        """Drops the record from the index (its files go with the sandbox dir)."""
        with self._lock:
            record = self._records.pop(sandbox_id, None)
            for cid in record.containers if record else ():
                self._container_index.pop(cid, None)
            self.unreadable.pop(sandbox_id, None)

    def exists(self, sandbox_id: str) -> bool:
        """True for a known sandbox, and for one whose record on disk could not be read (its id
        and directory are taken)."""
        with self._lock:
            return sandbox_id in self._records or sandbox_id in self.unreadable

    def is_unreadable(self, sandbox_id: str) -> bool:
        with self._lock:
            return sandbox_id in self.unreadable

    def has_container(self, container_id: str) -> bool:
        with self._lock:
            return container_id in self._container_index

    def get(self, sandbox_id: str) -> SandboxRecord:
        """Raises NotFound for an unknown sandbox."""
        with self._lock:
            record = self._records.get(sandbox_id)
            if record is None:
                raise NotFound(f"sandbox {sandbox_id} not found")
            return copy.deepcopy(record)

    def ids(self) -> list[str]:
        """Every sandbox that has a directory: the known ones and those whose record is unreadable."""
        with self._lock:
            return sorted({*self._records, *self.unreadable})

    def all(self) -> list[SandboxRecord]:
        with self._lock:
            return [copy.deepcopy(self._records[k]) for k in sorted(self._records)]

    def sandboxes_starting_with(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to ``limit`` sandbox ids that start with ``prefix``."""
        with self._lock:
            return [sandbox_id for sandbox_id in self._records if sandbox_id.startswith(prefix)][:limit]

    def containers_starting_with(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to ``limit`` container ids that start with ``prefix`` (a short id as crictl shows)."""
        with self._lock:
            found = []
            for container_id in self._container_index:
                if container_id.startswith(prefix):
                    found.append(container_id)
                    if len(found) >= limit:
                        break
            return found

    def sandbox_of(self, container_id: str) -> str:
        """The id of the sandbox that holds the container.

        Raises:
            NotFound: no sandbox has such a container.
        """
        with self._lock:
            sandbox_id = self._container_index.get(container_id)
        if sandbox_id is None:
            raise NotFound(f"container {container_id} not found")
        return sandbox_id


def _cri_facts(data: dict[str, Any]) -> dict[str, Any]:
    containers = data.get("containers") or {}
    return {
        "extra": data.get("extra") or {},
        "labels": data.get("labels") or {},
        "containers": {
            cid: {"name": c.get("name", ""), "extra": c.get("extra") or {}, "labels": c.get("labels") or {}}
            for cid, c in containers.items()
        },
    }

"""Image records: what the store keeps of each pulled image (``images/<hex>.json``), and how a
tag, a digest reference, an image id or a unique id prefix finds one."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.image.reference import Reference, parse_reference

log = logging.getLogger(__name__)

_ID = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
_ID_PREFIX = re.compile(r"(?:sha256:)?([0-9a-f]{1,63})")


@dataclass
class ImageRecord:
    """A pulled image. ``config`` is the image config's ``config`` object (Entrypoint, Cmd, Env,
    WorkingDir, User, StopSignal, Labels, ExposedPorts, ...); ``layers`` its diff_ids, bottom first;
    ``size`` the bytes its unpacked layers take on disk."""

    id: str
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    size: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    created: str = ""
    platform: str = ""
    pulled_at: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def digest_hex(digest: str) -> str:
    """The hex part of ``sha256:<hex>``: the name of an image's files and of a layer's directory."""
    return digest.partition(":")[2]


def id_hex(text: str) -> str | None:
    """The hex of a full image id (``sha256:<hex>`` or the bare hex); None if ``text`` is not one."""
    m = _ID.fullmatch(text)
    return m.group(1) if m else None


def find_record(records: Mapping[str, ImageRecord], text: str) -> ImageRecord | None:
    """The record ``text`` names: an id, a tag, a ``repo@sha256:`` digest or a unique id prefix; None if none.

    Raises:
        InvalidArgument: neither a valid reference nor an id prefix, or an ambiguous prefix.
    """
    m = _ID.fullmatch(text)
    if m:
        return records.get(f"sha256:{m.group(1)}")
    ref: Reference | None = None
    error: InvalidArgument | None = None
    try:
        ref = parse_reference(text)
    except InvalidArgument as e:
        error = e
    if ref is not None:
        for r in records.values():
            if (ref.tag and f"{ref.name}:{ref.tag}" in r.repo_tags) or (
                ref.digest and f"{ref.name}@{ref.digest}" in r.repo_digests
            ):
                return r
    m = _ID_PREFIX.fullmatch(text)
    if m:
        matches = [r for r in records.values() if digest_hex(r.id).startswith(m.group(1))]
        if len(matches) > 1:
            raise InvalidArgument(f"image id prefix {text!r} is ambiguous: {len(matches)} images match it")
        if matches:
            return matches[0]
    if error is not None:
        raise error
    return None


def save_record(images_dir: Path, record: ImageRecord) -> None:
    """Writes the record to ``images_dir/<hex>.json``, replacing the old one in one step."""
    path = images_dir / f"{digest_hex(record.id)}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(dataclasses.asdict(record), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_records(images_dir: Path) -> dict[str, ImageRecord]:
    """Every readable record in ``images_dir`` by id; unreadable ones are logged and left out."""
    records = {}
    for path in sorted(images_dir.glob("*.json")):
        try:
            record = ImageRecord.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            log.warning("image store: ignoring the unreadable record %s: %s", path, e)
            continue
        records[record.id] = record
    return records

"""OCI and Docker v2 manifests and indexes (manifest lists): parsing, checking, choosing a platform."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from kvmsandbox.errors import ContentError, NotFound

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# What the manifests endpoint is asked for; the registry picks the first it has.
ACCEPT = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: Any, what: str) -> Descriptor:
        """Raises: ContentError: not a descriptor, or a digest that is not sha256."""
        if not isinstance(value, dict):
            raise ContentError(f"{what}: a descriptor is not an object")
        digest, size = value.get("digest"), value.get("size")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ContentError(f"{what}: unsupported or malformed digest {digest!r} (only sha256 is supported)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ContentError(f"{what}: descriptor {digest} has an invalid size {size!r}")
        platform = value.get("platform")
        return cls(str(value.get("mediaType", "")), digest, size, platform if isinstance(platform, dict) else {})

    @property
    def platform_name(self) -> str:
        p = self.platform
        return "/".join(str(x) for x in (p.get("os", "?"), p.get("architecture", "?"), p.get("variant")) if x)


@dataclass(frozen=True)
class Index:
    manifests: list[Descriptor]


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]


def parse_manifest(data: bytes, content_type: str, what: str) -> Index | Manifest:
    """An index or an image manifest from the registry's bytes; the media type comes from the
    document's ``mediaType`` or, failing that, the Content-Type header or the document's shape.

    Raises:
        ContentError: not JSON, schema 1, an unknown media type, or missing fields.
    """
    try:
        doc = json.loads(data)
    except ValueError:
        raise ContentError(f"{what}: the manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise ContentError(f"{what}: the manifest is not a JSON object")
    media_type = doc.get("mediaType") or content_type
    if media_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ContentError(
            f"{what}: Docker schema 1 manifests are not supported (push the image again with a current tool)"
        )
    if media_type not in INDEX_TYPES + MANIFEST_TYPES:
        if "manifests" in doc:
            media_type = OCI_INDEX
        elif "layers" in doc and "config" in doc:
            media_type = OCI_MANIFEST
        else:
            raise ContentError(f"{what}: unsupported manifest media type {media_type!r}")
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ContentError(f"{what}: the index has no manifests list")
        return Index([Descriptor.from_json(m, what) for m in entries])
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ContentError(f"{what}: the manifest has no layers list")
    return Manifest(Descriptor.from_json(doc.get("config"), what), [Descriptor.from_json(x, what) for x in layers])


def choose_platform(index: Index, os: str, architecture: str, what: str) -> Descriptor:
    """The index's image manifest for ``os``/``architecture`` (the first, as containerd picks).

    Raises:
        NotFound: the index has no image for that platform; the message lists the ones it has.
    """
    for d in index.manifests:
        if (
            d.platform.get("os") == os
            and d.platform.get("architecture") == architecture
            and d.media_type not in INDEX_TYPES
        ):
            return d
    have = ", ".join(d.platform_name for d in index.manifests) or "none"
    raise NotFound(f"{what}: the image has no {os}/{architecture} variant (it has: {have})")

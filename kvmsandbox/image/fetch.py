"""What a pull fetches from one registry endpoint, each piece checked against its digest: the
manifest for this node's platform, the image config with its layers' diff_ids, and a layer,
unpacked into the directory it is kept in."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from kvmsandbox.config import ImageLimits
from kvmsandbox.errors import ContentError, LimitExceeded
from kvmsandbox.image.manifest import (
    ACCEPT,
    DOCKER_CONFIG,
    OCI_CONFIG,
    Descriptor,
    Index,
    Manifest,
    choose_platform,
    parse_manifest,
)
from kvmsandbox.image.reference import Reference
from kvmsandbox.image.registry import RegistryClient
from kvmsandbox.image.unpack import LayerUsage, unpack_layer

log = logging.getLogger(__name__)

_DIFF_ID = re.compile(r"sha256:[0-9a-f]{64}")


def fetch_manifest(client: RegistryClient, ref: Reference, os_name: str, architecture: str) -> tuple[Manifest, str]:
    """The image manifest for the platform (chosen from the index when ``ref`` names one), and the
    digest of the manifest ``ref`` names.

    Raises:
        ContentError: a digest mismatch, or an index entry that is itself an index.
        NotFound: no variant for the platform; and what RegistryClient.get_manifest raises.
    """
    data, media_type = client.get_manifest(ref.object, ACCEPT)
    manifest_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if ref.digest and manifest_digest != ref.digest:
        raise ContentError(
            f"{ref}: digest mismatch for the manifest: the registry sent content whose digest is {manifest_digest}"
        )
    doc = parse_manifest(data, media_type, str(ref))
    if isinstance(doc, Index):
        chosen = choose_platform(doc, os_name, architecture, str(ref))
        data, media_type = client.get_manifest(chosen.digest, ACCEPT)
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != chosen.digest:
            raise ContentError(
                f"{ref}: digest mismatch for manifest {chosen.digest}: the registry sent content whose digest is " + got
            )
        doc = parse_manifest(data, media_type, str(ref))
        if not isinstance(doc, Manifest):
            raise ContentError(f"{ref}: the index entry for {chosen.platform_name} is itself an index")
    return doc, manifest_digest


def fetch_config(client: RegistryClient, ref: Reference, manifest: Manifest) -> tuple[dict[str, Any], list[str]]:
    """The image config of ``manifest`` and its layers' diff_ids, bottom first.

    Raises:
        ContentError: not a container image, a layer that is not a filesystem, or a config without
            one sha256 diff_id per layer; and what RegistryClient.get_blob_bytes raises.
    """
    if manifest.config.media_type not in ("", OCI_CONFIG, DOCKER_CONFIG):
        raise ContentError(f"{ref} is not a container image (its config is {manifest.config.media_type})")
    for layer in manifest.layers:
        if layer.media_type and "tar" not in layer.media_type:
            raise ContentError(f"{ref}: layer {layer.digest} is not a filesystem layer ({layer.media_type})")
    try:
        image_config = json.loads(client.get_blob_bytes(manifest.config.digest, manifest.config.size))
        diff_ids = image_config["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise ContentError(f"{ref}: the image config {manifest.config.digest} has no rootfs.diff_ids") from None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and _DIFF_ID.fullmatch(d) for d in diff_ids):
        raise ContentError(f"{ref}: the image config's diff_ids are not all sha256 digests")
    if len(diff_ids) != len(manifest.layers):
        raise ContentError(
            f"{ref}: the manifest has {len(manifest.layers)} layers but the config {len(diff_ids)} diff_ids"
        )
    if not isinstance(image_config.get("config") or {}, dict):
        raise ContentError(f"{ref}: the image config's config is not an object")
    return image_config, diff_ids


def fetch_layer(
    client: RegistryClient,
    ref: Reference,
    layer: Descriptor,
    diff_id: str,
    work: Path,
    final: Path,
    limits: ImageLimits | None = None,
) -> LayerUsage:
    """Downloads ``layer`` into ``work``, unpacks it there and renames the tree to ``final``.

    Raises:
        ContentError: the blob or its content does not match its digests, or is not a usable layer;
            and what RegistryClient.download_blob raises.
        LimitExceeded: the layer is larger (compressed, unpacked, in entries or a header) than
            ``limits`` allow.
    """
    limits = limits or ImageLimits()
    if layer.size > limits.max_layer_bytes:
        raise LimitExceeded(
            f"{ref}: layer {layer.digest} is {layer.size} bytes, more than {limits.max_layer_bytes} "
            "(registry.limits.max_layer_bytes)"
        )
    started = time.monotonic()
    client.download_blob(layer.digest, layer.size, work / "blob")
    downloaded = time.monotonic()
    try:
        usage = unpack_layer(work / "blob", work / "tree", diff_id, limits)
    except LimitExceeded as e:
        raise LimitExceeded(f"{ref}: layer {layer.digest}: {e}") from None
    except ContentError as e:
        raise ContentError(f"{ref}: layer {layer.digest}: {e}") from None
    os.rename(work / "tree", final)
    log.info(
        "image %s: layer %s unpacked bytes=%d download_seconds=%.2f unpack_seconds=%.2f",
        ref,
        diff_id,
        usage.bytes,
        downloaded - started,
        time.monotonic() - downloaded,
    )
    return usage

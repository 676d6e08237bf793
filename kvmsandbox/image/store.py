"""The image store: pulls images from registries (or their mirrors) and keeps them on disk, each
layer unpacked once and shared read-only by every image and container that uses it.

Layout under the store's root (the runtime passes ``config.image_dir``)::

    images/<hex>.json        one record per image; <hex> is its id (the config digest) without "sha256:"
    layers/<hex>/            one unpacked layer, named by its diff_id: an overlay lowerdir
    holds/<hex>/<holder>     containers using an image (empty files, so holds survive a restart)
    tmp/                     downloads and unpacks under way, renamed into layers/ when complete

Blobs are not kept after unpacking: a layer dir exists only once its blob and its uncompressed
content matched their digests.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.config import RegistryConfig
from kvmsandbox.errors import FailedPrecondition, InvalidArgument, KvmSandboxError, NotFound
from kvmsandbox.host.beneath import private_dir
from kvmsandbox.image.blocks import EROFS_SUFFIX, erofs_image, layer_of
from kvmsandbox.image.fetch import fetch_config, fetch_layer, fetch_manifest
from kvmsandbox.image.manifest import Descriptor
from kvmsandbox.image.records import ImageRecord, digest_hex, find_record, id_hex, load_records, save_record
from kvmsandbox.image.reference import Reference, parse_reference
from kvmsandbox.image.registry import Auth, Endpoint, RegistryClient, endpoints_for
from kvmsandbox.image.unpack import LayerUsage, tree_usage

log = logging.getLogger(__name__)

_HOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class FsUsage:
    """What the store takes on its filesystem, for ImageFsInfo."""

    used_bytes: int
    inodes_used: int
    mountpoint: Path


class ImageStore:
    """Pulled images on disk, safe to use from many threads.

    Two pulls of the same reference (with the same credentials) at once do the work once: the
    second waits for the first and gets its result. Layers shared by images pulled at once are
    fetched and unpacked once.
    """

    def __init__(
        self,
        root: Path,
        registry: RegistryConfig,
        *,
        timeout: float = 30.0,
        platform: str = "linux/amd64",
        parallel_downloads: int = 3,
        layer_images: bool = False,
    ) -> None:
        self.root = root
        self.registry = registry
        self.timeout = timeout
        self.os, _, self.architecture = platform.partition("/")
        self.parallel_downloads = parallel_downloads
        # Make each layer's erofs image as it is pulled (containers get layers as disks).
        self.layer_images = layer_images
        self._images = root / "images"
        self._layers = root / "layers"
        self._holds = root / "holds"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()
        self._flights: dict[str, Future[ImageRecord]] = {}
        self._layer_locks: dict[str, threading.Lock] = {}
        # Layers a pull under way relies on: never collected, even before its record exists.
        self._pins: Counter[str] = Counter()
        self._usage: dict[str, LayerUsage] = {}
        # Unpacked layers keep their setuid files and device nodes: for the guests, not the host.
        private_dir(root)
        for d in (self._images, self._layers, self._holds):
            d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        for leftover in self._layers.glob(".*.tmp"):  # layer images cut short by a stop
            leftover.unlink(missing_ok=True)
        self._records = load_records(self._images)
        with self._lock:
            doomed = self._collect_unused_layers()
        self._delete(doomed)

    # -- pull --

    def pull(self, ref: str, auth: Auth | None = None) -> ImageRecord:
        """Pulls ``ref`` (from the first configured mirror that has it, then the registry) and
        returns its record; an image already present is only re-tagged.

        Raises:
            InvalidArgument: a malformed reference or auth string.
            NotFound: no such repository, tag or digest, or no variant for the platform (the registry's
                words in the message).
            Unavailable: the registry cannot be reached or failed.
            RegistryAuthError: credentials missing or refused.
            ContentError: a digest or size mismatch, or content that is not a usable image; nothing is stored.
        """
        reference = parse_reference(ref)
        key = str(reference)
        if auth is not None:
            auth.credentials()  # a malformed auth string is a bad request even where none is asked for
            key += "\0" + hashlib.sha256(repr(auth).encode()).hexdigest()
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if not leader:
            log.info("image %s: joining the pull under way", reference)
            return copy.deepcopy(flight.result())
        try:
            record = self._pull(reference, auth)
        except BaseException as e:
            flight.set_exception(e)
            raise
        else:
            flight.set_result(record)
            return copy.deepcopy(record)
        finally:
            with self._lock:
                del self._flights[key]

    def _pull(self, ref: Reference, auth: Auth | None) -> ImageRecord:
        started = time.monotonic()
        endpoints = endpoints_for(ref, self.registry)
        log.info("image %s: pulling (endpoints: %s)", ref, ", ".join(e.base for e in endpoints))
        failures: list[KvmSandboxError] = []
        for endpoint in endpoints:
            try:
                record = self._pull_from(endpoint, ref, auth)
            except KvmSandboxError as e:
                log.warning("image %s: pull from %s failed: %s", ref, endpoint.base, e)
                failures.append(e)
                continue
            log.info(
                "image %s: pulled id=%s from=%s layers=%d size=%d seconds=%.2f",
                ref,
                record.id,
                endpoint.base,
                len(record.layers),
                record.size,
                time.monotonic() - started,
            )
            return record
        if len(failures) == 1:
            raise failures[0]
        # The registry's own answer decides the kind of error; the message has every endpoint's.
        raise type(failures[-1])(f"{ref}: no endpoint could serve the image: " + " | ".join(map(str, failures)))

    def _pull_from(self, endpoint: Endpoint, ref: Reference, auth: Auth | None) -> ImageRecord:
        client = RegistryClient(endpoint, ref, self.registry, auth, self.timeout)
        doc, manifest_digest = fetch_manifest(client, ref, self.os, self.architecture)
        with self._lock:
            existing = copy.deepcopy(self._records.get(doc.config.digest))
        if existing is not None:
            with self._pinned(existing.layers):
                if all((self._layers / digest_hex(d)).is_dir() for d in existing.layers):
                    return self._commit(ref, manifest_digest, existing)
        image_config, diff_ids = fetch_config(client, ref, doc)
        with self._pinned(diff_ids):
            self._ensure_layers(client, ref, doc.layers, diff_ids)
            record = ImageRecord(
                id=doc.config.digest,
                size=sum(self._layer_usage(digest_hex(d)).bytes for d in diff_ids),
                config=image_config.get("config") or {},
                layers=diff_ids,
                created=str(image_config.get("created", "")),
                platform=f"{image_config.get('os', '')}/{image_config.get('architecture', '')}",
            )
            return self._commit(ref, manifest_digest, record)

    def _ensure_layers(
        self, client: RegistryClient, ref: Reference, layers: list[Descriptor], diff_ids: list[str]
    ) -> None:
        todo = {
            d: layer for layer, d in zip(layers, diff_ids, strict=True) if not (self._layers / digest_hex(d)).is_dir()
        }
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=max(1, min(self.parallel_downloads, len(todo)))) as pool:
            futures = [pool.submit(self._ensure_layer, client, ref, layer, d) for d, layer in todo.items()]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _ensure_layer(self, client: RegistryClient, ref: Reference, layer: Descriptor, diff_id: str) -> None:
        name = digest_hex(diff_id)
        final = self._layers / name
        with self._layer_lock(name):
            if final.is_dir():
                return
            final.with_name(name + EROFS_SUFFIX).unlink(missing_ok=True)  # left by a removal cut short
            work = Path(tempfile.mkdtemp(prefix=f"layer-{name[:12]}-", dir=self._tmp))
            try:
                usage = fetch_layer(client, ref, layer, diff_id, work, final, self.registry.limits)
                with self._lock:
                    self._usage[name] = usage
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if self.layer_images:
                try:
                    erofs_image(final)
                except KvmSandboxError as e:
                    # Made again when a container first needs it (and that reports the failure).
                    log.warning("image store: layer sha256:%s: %s", name, e)

    def _commit(self, ref: Reference, manifest_digest: str, record: ImageRecord) -> ImageRecord:
        with self._lock:
            record = self._records.get(record.id, record)
            if ref.tag:
                tag = f"{ref.name}:{ref.tag}"
                for other in self._records.values():
                    if other.id != record.id and tag in other.repo_tags:
                        other.repo_tags.remove(tag)
                        save_record(self._images, other)
                        log.info("image %s: tag moved away from id=%s", ref, other.id)
                if tag not in record.repo_tags:
                    record.repo_tags.append(tag)
            digest_ref = f"{ref.name}@{manifest_digest}"
            if digest_ref not in record.repo_digests:
                record.repo_digests.append(digest_ref)
            record.pulled_at = time.time()
            save_record(self._images, record)
            self._records[record.id] = record
            return copy.deepcopy(record)

    # -- queries --

    def status(self, ref_or_id: str) -> ImageRecord | None:
        """The image named by a tag, a ``repo@sha256:`` digest, its id or a unique id prefix; None if absent.

        Raises:
            InvalidArgument: neither a valid reference nor an id prefix, or an ambiguous prefix.
        """
        with self._lock:
            return copy.deepcopy(find_record(self._records, ref_or_id))

    def layer_dirs(self, image_id: str) -> list[Path]:
        """The image's unpacked layers, top first: the lowerdirs of an overlay.

        Raises:
            NotFound: no such image, or a layer is missing on disk.
        """
        with self._lock:
            record = find_record(self._records, image_id)
            if record is None:
                raise NotFound(f"image {image_id} is not present on this node")
            dirs: list[Path] = []
            for diff_id in reversed(record.layers):
                path = self._layers / digest_hex(diff_id)
                # A layer listed twice needs only its top occurrence: the lower one is hidden by it.
                if path in dirs:
                    continue
                if not path.is_dir():
                    raise NotFound(
                        f"layer {diff_id} of image {record.id} is missing from the store: pull the image again"
                    )
                dirs.append(path)
            return dirs

    def fs_usage(self) -> FsUsage:
        """Bytes and inodes the store takes, counted on disk (unpacked layers once each, as they are immutable)."""
        with self._lock:
            names = [p.name for p in self._layers.iterdir() if not p.name.startswith(".")]
        parts = [tree_usage(p) for p in self.root.iterdir() if p != self._layers]
        parts += [LayerUsage(0, 2)]  # the root and layers/ directories themselves
        parts += [self._layer_usage(name) for name in names]
        mountpoint = self.root.resolve()
        while not os.path.ismount(mountpoint):
            mountpoint = mountpoint.parent
        return FsUsage(sum(p.bytes for p in parts), sum(p.inodes for p in parts), mountpoint)

    # -- removal and holds --

    def remove(self, ref_or_id: str) -> None:
        """Removes the image (all its tags) and deletes the layers no other image uses.
        Removing an image that is not present is not an error.

        Raises:
            FailedPrecondition: a container holds the image.
            InvalidArgument: as status.
        """
        with self._lock:
            record = find_record(self._records, ref_or_id)
            if record is None:
                log.info("image %s: not present, nothing to remove", ref_or_id)
                return
            holders = self._holders(record.id)
            if holders:
                raise FailedPrecondition(
                    f"image {ref_or_id} ({record.id}) is in use by container(s) {', '.join(holders)}: remove them first"
                )
            (self._images / f"{digest_hex(record.id)}.json").unlink(missing_ok=True)
            shutil.rmtree(self._holds / digest_hex(record.id), ignore_errors=True)
            del self._records[record.id]
            doomed = self._collect_unused_layers()
        self._delete(doomed)
        log.info(
            "image %s: removed id=%s tags=%s layers_deleted=%d", ref_or_id, record.id, record.repo_tags, len(doomed)
        )

    def hold(self, image_id: str, holder_id: str) -> None:
        """Marks the image as used by ``holder_id`` (a container id): remove refuses it until released.

        Raises:
            NotFound: no such image. InvalidArgument: a holder id that is not a plain name.
        """
        if not _HOLDER.fullmatch(holder_id):
            raise InvalidArgument(f"invalid image holder id {holder_id!r}")
        with self._lock:
            record = find_record(self._records, image_id)
            if record is None:
                raise NotFound(f"image {image_id} is not present on this node")
            d = self._holds / digest_hex(record.id)
            d.mkdir(exist_ok=True)
            (d / holder_id).touch()
        log.info("image %s: held by %s", record.id, holder_id)

    def release(self, image_id: str, holder_id: str) -> None:
        """Undoes hold; idempotent, and not an error for an image or holder that is gone."""
        if not _HOLDER.fullmatch(holder_id):
            return
        with self._lock:
            record = None
            with contextlib.suppress(InvalidArgument):
                record = find_record(self._records, image_id)
            name = digest_hex(record.id) if record else id_hex(image_id)
            if name is None:
                return
            d = self._holds / name
            (d / holder_id).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                d.rmdir()
        log.info("image %s: released by %s", image_id, holder_id)

    def release_all_but(self, live: set[str]) -> list[str]:
        """Drops the holds of holders not in ``live`` (containers removed while no server ran, or
        by a tool that bypassed the CRI); returns the dropped holder ids."""
        dropped: list[str] = []
        with self._lock:
            for d in list(self._holds.iterdir()):
                for h in list(d.iterdir()):
                    if h.name not in live:
                        h.unlink(missing_ok=True)
                        dropped.append(h.name)
                with contextlib.suppress(OSError):
                    d.rmdir()
        if dropped:
            log.info("image holds of gone containers released: %s", ", ".join(dropped))
        return dropped

    def holders(self, image_id: str) -> list[str]:
        """The holders of an image (for reconciling after a restart); empty for an unknown image."""
        with self._lock:
            record = find_record(self._records, image_id)
            return self._holders(record.id) if record else []

    # -- internals --

    def _holders(self, image_id: str) -> list[str]:
        d = self._holds / digest_hex(image_id)
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def _layer_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._layer_locks.setdefault(name, threading.Lock())

    @contextlib.contextmanager
    def _pinned(self, diff_ids: list[str]) -> Iterator[None]:
        names = [digest_hex(d) for d in diff_ids]
        with self._lock:
            self._pins.update(names)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(names)
                self._pins += Counter()  # drops the zero counts
                doomed = self._collect_unused_layers()
            # A failed pull leaves nothing behind: its layers no image uses are deleted.
            self._delete(doomed)

    def _collect_unused_layers(self) -> list[Path]:
        """Moves the layers no image uses and no pull relies on into tmp/; call with the lock held."""
        used = {digest_hex(d) for r in self._records.values() for d in r.layers} | set(self._pins)
        doomed = []
        for path in self._layers.iterdir():
            # A layer's erofs image (and one being made) goes with it.
            if layer_of(path) not in used:
                target = self._tmp / f"deleting-{path.name}-{time.monotonic_ns()}"
                os.rename(path, target)
                self._usage.pop(path.name, None)
                doomed.append(target)
                log.info("image store: layer sha256:%s is no longer used, deleting it", path.name)
        return doomed

    @staticmethod
    def _delete(paths: list[Path]) -> None:
        for path in paths:  # layer dirs, and their erofs images
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def _layer_usage(self, name: str) -> LayerUsage:
        with self._lock:
            cached = self._usage.get(name)
        if cached is None:
            cached = tree_usage(self._layers / name)
            with self._lock:
                self._usage[name] = cached
        return cached

    # Last in the class: below it, ``list`` in an annotation would name this method.
    def list(self, filter_ref: str | None = None) -> list[ImageRecord]:
        """Every image, or only the one ``filter_ref`` names (as status resolves it).

        Raises:
            InvalidArgument: as status.
        """
        with self._lock:
            if filter_ref:
                found = find_record(self._records, filter_ref)
                return [copy.deepcopy(found)] if found else []
            return [copy.deepcopy(r) for r in sorted(self._records.values(), key=lambda r: (r.repo_tags, r.id))]

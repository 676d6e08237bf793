"""Pulls from a real docker-registry on loopback into a real store; no VMs."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tarfile
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.agent.linux import mount, umount
from kvmsandbox.config import ImageLimits, RegistryConfig
from kvmsandbox.errors import FailedPrecondition, InvalidArgument, LimitExceeded, NotFound, Unavailable
from kvmsandbox.image import Auth, ContentError, ImageRecord, ImageStore, RegistryAuthError
from tests.registry import (
    Layer,
    PushedImage,
    Registry,
    free_port,
    image_config,
    make_layer,
    push_image,
    push_index,
    running_registry,
)


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def unique_layer(tmp_path: Path) -> Layer:
    """A layer no other test pushes, so tests that count or corrupt blobs do not disturb each other."""
    return make_layer(tree(tmp_path / f"t-{uuid.uuid4().hex}", {"id": uuid.uuid4().hex}))


def assert_store_is_empty(store: ImageStore) -> None:
    assert store.list() == []
    assert list((store.root / "layers").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "merged"
    target.mkdir()
    yield target
    if os.path.ismount(target):
        umount(str(target))


def test_pull_by_tag_records_the_image_and_unpacks_its_layer(
    store: ImageStore, registry: Registry, busybox_image: PushedImage
) -> None:
    record = store.pull(f"{registry.host}/busybox:1.0")

    assert record.id == busybox_image.config_digest
    assert record.repo_tags == [f"{registry.host}/busybox:1.0"]
    assert record.repo_digests == [f"{registry.host}/busybox@{busybox_image.manifest_digest}"]
    assert record.config["Cmd"] == ["/bin/sh"]
    assert record.platform == "linux/amd64"
    assert record.size > 1_000_000
    (layer,) = store.layer_dirs(record.id)
    assert os.access(layer / "bin/busybox", os.X_OK)
    assert os.readlink(layer / "bin/sh") == "/bin/busybox"
    assert stat.S_IMODE((layer / "tmp").stat().st_mode) == 0o1777
    assert (layer / "etc/passwd").read_text().startswith("root:x:0:0")


def test_pull_by_digest_records_only_the_digest(
    store: ImageStore, registry: Registry, busybox_image: PushedImage
) -> None:
    record = store.pull(f"{registry.host}/busybox@{busybox_image.manifest_digest}")

    assert record.repo_tags == []
    assert record.repo_digests == [f"{registry.host}/busybox@{busybox_image.manifest_digest}"]
    assert store.status(f"{registry.host}/busybox:1.0") is None


def test_status_finds_an_image_by_tag_digest_id_and_id_prefix(
    store: ImageStore, registry: Registry, busybox_image: PushedImage
) -> None:
    record = store.pull(f"{registry.host}/busybox:1.0")
    hex_id = record.id.partition(":")[2]

    for name in (
        f"{registry.host}/busybox:1.0",
        f"{registry.host}/busybox@{busybox_image.manifest_digest}",
        record.id,
        hex_id,
        hex_id[:12],
        f"sha256:{hex_id[:8]}",
    ):
        found = store.status(name)
        assert found is not None and found.id == record.id, name
    assert store.status(f"{registry.host}/busybox:2.0") is None
    assert store.status("busybox") is None
    assert [r.id for r in store.list()] == [record.id]
    assert [r.id for r in store.list(f"{registry.host}/busybox:1.0")] == [record.id]
    assert store.list(f"{registry.host}/other:1") == []


def test_whiteouts_and_opaque_dirs_hide_lower_content_in_the_overlay(
    store: ImageStore, registry: Registry, busybox_image_layer: Layer, tmp_path: Path, overlay: Path
) -> None:
    lower = make_layer(tree(tmp_path / "lower", {"data/keep": "k", "data/gone": "g", "opq/old1": "1", "opq/old2": "2"}))
    upper = make_layer(tree(tmp_path / "upper", {"opq/new": "n"}), whiteouts=["data/gone"], opaque_dirs=["opq"])
    push_image(registry, "layered", "1", [busybox_image_layer, lower, upper])

    record = store.pull(f"{registry.host}/layered:1")
    dirs = store.layer_dirs(record.id)
    assert len(dirs) == 3
    whiteout = (dirs[0] / "data/gone").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(dirs[0] / "opq", "trusted.overlay.opaque") == b"y"

    mount("overlay", str(overlay), "overlay", 0, "lowerdir=" + ":".join(map(str, dirs)))
    assert (overlay / "data/keep").read_text() == "k"
    assert not (overlay / "data/gone").exists()
    assert sorted(os.listdir(overlay / "opq")) == ["new"]
    assert (overlay / "bin/busybox").is_file()


def test_an_index_pull_picks_linux_amd64(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    arm = make_layer(tree(tmp_path / "arm", {"arch": "arm64"}))
    amd = make_layer(tree(tmp_path / "amd", {"arch": "amd64"}))
    arm_image = push_image(registry, "multi", None, [arm], image_config([arm], architecture="arm64"))
    amd_image = push_image(registry, "multi", None, [amd])
    index_digest = push_index(registry, "multi", "1", [("linux/arm64", arm_image), ("linux/amd64", amd_image)])

    record = store.pull(f"{registry.host}/multi:1")

    assert record.id == amd_image.config_digest
    assert record.platform == "linux/amd64"
    assert record.repo_digests == [f"{registry.host}/multi@{index_digest}"]
    assert (store.layer_dirs(record.id)[0] / "arch").read_text() == "amd64"


def test_docker_manifest_list_and_manifest_v2_are_understood(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    layer = make_layer(tree(tmp_path / "d", {"docker": "yes"}))
    image = push_image(registry, "dockerish", None, [layer], docker_media_types=True)
    push_index(registry, "dockerish", "1", [("linux/amd64", image)], docker_media_types=True)

    record = store.pull(f"{registry.host}/dockerish:1")

    assert (store.layer_dirs(record.id)[0] / "docker").read_text() == "yes"


def test_an_index_without_amd64_is_not_found_naming_what_it_has(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    arm = make_layer(tree(tmp_path / "arm", {"arch": "arm64"}))
    arm_image = push_image(registry, "armonly", None, [arm], image_config([arm], architecture="arm64"))
    push_index(registry, "armonly", "1", [("linux/arm64", arm_image)])

    with pytest.raises(NotFound, match=r"no linux/amd64 variant \(it has: linux/arm64\)"):
        store.pull(f"{registry.host}/armonly:1")
    assert_store_is_empty(store)


def test_a_zstd_layer_is_unpacked(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    layer = make_layer(tree(tmp_path / "z", {"zstd": "yes"}), compression="zstd")
    push_image(registry, "zstd", "1", [layer])

    record = store.pull(f"{registry.host}/zstd:1")

    assert (store.layer_dirs(record.id)[0] / "zstd").read_text() == "yes"


def test_a_corrupted_layer_blob_fails_with_a_digest_error_and_stores_nothing(
    store: ImageStore, registry: Registry, busybox_image_layer: Layer, tmp_path: Path
) -> None:
    bad = unique_layer(tmp_path)
    push_image(registry, "corrupt", "1", [busybox_image_layer, bad])
    blob = registry.blob_path(bad.digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    with pytest.raises(ContentError, match=f"digest mismatch for blob {bad.digest}"):
        store.pull(f"{registry.host}/corrupt:1")
    assert_store_is_empty(store)


def test_a_layer_whose_content_does_not_match_its_diff_id_is_refused(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    layer = unique_layer(tmp_path)
    lying = Layer(layer.blob, "sha256:" + "0" * 64, layer.media_type)
    push_image(registry, "lying", "1", [layer], image_config([lying]))

    with pytest.raises(ContentError, match="digest mismatch for layer sha256:0000"):
        store.pull(f"{registry.host}/lying:1")
    assert_store_is_empty(store)


def test_a_manifest_pulled_by_digest_must_match_it(store: ImageStore, registry: Registry, tmp_path: Path) -> None:
    image = push_image(registry, "tampered", None, [unique_layer(tmp_path)])
    blob = registry.blob_path(image.manifest_digest)
    blob.write_bytes(blob.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))

    with pytest.raises(ContentError, match="digest mismatch for the manifest"):
        store.pull(f"{registry.host}/tampered@{image.manifest_digest}")
    assert_store_is_empty(store)


def test_a_missing_tag_is_not_found_with_the_registrys_words(
    store: ImageStore, registry: Registry, busybox_image: PushedImage
) -> None:
    with pytest.raises(NotFound, match="manifest unknown"):
        store.pull(f"{registry.host}/busybox:no-such-tag")
    with pytest.raises(NotFound, match="manifest unknown"):
        store.pull(f"{registry.host}/no/such/repo:1")


@pytest.mark.parametrize("ref", ["UPPER/Case::x", "busybox:", "a//b", "busybox@sha256:abc", " busybox"])
def test_a_malformed_reference_is_an_invalid_argument(store: ImageStore, ref: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid image reference"):
        store.pull(ref)


def test_an_unreachable_registry_is_unavailable(store: ImageStore) -> None:
    with pytest.raises(Unavailable, match="unreachable"):
        store.pull(f"127.0.0.1:{free_port()}/busybox:1")


def test_a_mirror_serves_a_public_name_recorded_under_that_name(
    tmp_path: Path, registry: Registry, busybox_image_layer: Layer
) -> None:
    image = push_image(registry, "testimg", "1", [busybox_image_layer])
    store = ImageStore(tmp_path / "images", RegistryConfig(mirrors={"registry.k8s.io": [registry.url]}))

    record = store.pull("registry.k8s.io/testimg:1")

    assert record.repo_tags == ["registry.k8s.io/testimg:1"]
    assert record.repo_digests == [f"registry.k8s.io/testimg@{image.manifest_digest}"]
    assert registry.count_requests("GET", "/v2/testimg/manifests/1?ns=registry.k8s.io") == 1
    found = store.status("registry.k8s.io/testimg:1")
    assert found is not None and found.id == image.config_digest


def test_concurrent_pulls_of_one_image_do_the_work_once(
    store: ImageStore, registry: Registry, busybox_image_layer: Layer, tmp_path: Path
) -> None:
    own = unique_layer(tmp_path)
    image = push_image(registry, "together", "1", [busybox_image_layer, own])
    start = threading.Barrier(6)
    results: list[ImageRecord] = []

    def pull() -> None:
        start.wait()
        results.append(store.pull(f"{registry.host}/together:1"))

    threads = [threading.Thread(target=pull) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert [r.id for r in results] == [image.config_digest] * 6
    assert registry.count_requests("GET", "/v2/together/manifests/1") == 1
    assert registry.count_requests("GET", f"/v2/together/blobs/{own.digest}") == 1


def test_concurrent_pulls_of_two_images_fetch_a_shared_layer_once(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    shared = unique_layer(tmp_path)
    a = push_image(registry, "share-a", "1", [shared, unique_layer(tmp_path)])
    b = push_image(registry, "share-b", "1", [shared, unique_layer(tmp_path)])
    start = threading.Barrier(2)

    def pull(name: str) -> None:
        start.wait()
        store.pull(f"{registry.host}/{name}:1")

    threads = [threading.Thread(target=pull, args=(n,)) for n in ("share-a", "share-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    fetched = registry.count_requests("GET", f"/blobs/{shared.digest}")
    assert fetched == 1
    assert store.layer_dirs(a.config_digest)[1] == store.layer_dirs(b.config_digest)[1]


def test_remove_is_idempotent_and_deletes_only_unused_layers(
    store: ImageStore, registry: Registry, busybox_image_layer: Layer, busybox_image: PushedImage, tmp_path: Path
) -> None:
    extra = unique_layer(tmp_path)
    push_image(registry, "bigger", "1", [busybox_image_layer, extra])
    small = store.pull(f"{registry.host}/busybox:1.0")
    big = store.pull(f"{registry.host}/bigger:1")
    shared, own = store.layer_dirs(big.id)[1], store.layer_dirs(big.id)[0]

    store.remove(f"{registry.host}/bigger:1")

    assert store.status(big.id) is None
    assert not own.exists()
    assert shared.is_dir() and store.layer_dirs(small.id) == [shared]
    store.remove(f"{registry.host}/bigger:1")
    store.remove(big.id)
    store.remove(small.id[:20])
    assert_store_is_empty(store)


def test_layer_images_are_made_at_pull_shared_and_removed_with_their_last_image(
    registry: Registry, busybox_image_layer: Layer, busybox_image: PushedImage, tmp_path: Path
) -> None:
    store = ImageStore(tmp_path / "blocks", RegistryConfig(), layer_images=True)
    extra = unique_layer(tmp_path)
    push_image(registry, "with-erofs", "1", [busybox_image_layer, extra])
    small = store.pull(f"{registry.host}/busybox:1.0")
    big = store.pull(f"{registry.host}/with-erofs:1")
    own, shared = (d.with_name(d.name + ".erofs") for d in store.layer_dirs(big.id))
    assert own.is_file() and shared.is_file() and stat.S_IMODE(shared.stat().st_mode) == 0o600
    mtime = shared.stat().st_mtime_ns
    store.remove(big.id)
    # The layer only the removed image used goes with its image; the shared one stays as it was.
    assert not own.exists() and shared.stat().st_mtime_ns == mtime
    # A layer image cut short by a stop is deleted when the store opens again.
    (shared.parent / f".{shared.stem}.abcd.tmp").write_bytes(b"half")
    again = ImageStore(store.root, RegistryConfig(), layer_images=True)
    assert not (shared.parent / f".{shared.stem}.abcd.tmp").exists()
    again.remove(small.id)
    assert sorted(p.name for p in (store.root / "layers").iterdir()) == []


def test_a_held_image_cannot_be_removed_until_released(
    store: ImageStore, registry: Registry, busybox_image: PushedImage, tmp_path: Path
) -> None:
    record = store.pull(f"{registry.host}/busybox:1.0")
    store.hold(record.id, "c0ffee")
    store.hold(record.id, "decaf")

    with pytest.raises(FailedPrecondition, match=r"in use by container\(s\) c0ffee, decaf"):
        store.remove(record.id)
    # Holds are on disk: a restarted runtime still refuses.
    again = ImageStore(store.root, RegistryConfig())
    assert again.holders(record.id) == ["c0ffee", "decaf"]
    with pytest.raises(FailedPrecondition):
        again.remove(f"{registry.host}/busybox:1.0")

    # At start the server keeps only the holds of containers that still exist.
    assert again.release_all_but({"decaf", "other"}) == ["c0ffee"]
    assert again.holders(record.id) == ["decaf"]
    again.release(record.id, "c0ffee")
    again.release(record.id, "decaf")
    again.release(record.id, "decaf")
    again.remove(f"{registry.host}/busybox:1.0")
    assert again.status(record.id) is None


def test_a_restarted_store_finds_its_images(store: ImageStore, registry: Registry, busybox_image: PushedImage) -> None:
    record = store.pull(f"{registry.host}/busybox:1.0")

    again = ImageStore(store.root, RegistryConfig())

    assert again.status(f"{registry.host}/busybox:1.0") == record
    assert again.layer_dirs(record.id) == store.layer_dirs(record.id)


def test_pulling_a_present_image_under_a_new_tag_downloads_no_layer(
    store: ImageStore, registry: Registry, tmp_path: Path
) -> None:
    layer = unique_layer(tmp_path)
    push_image(registry, "retag", "1", [layer])
    push_image(registry, "retag", "2", [layer])
    first = store.pull(f"{registry.host}/retag:1")

    second = store.pull(f"{registry.host}/retag:2")

    assert second.id == first.id
    assert second.repo_tags == [f"{registry.host}/retag:1", f"{registry.host}/retag:2"]
    assert registry.count_requests("GET", f"/blobs/{layer.digest}") == 1


def test_fs_usage_counts_the_store_on_disk(store: ImageStore, registry: Registry, busybox_image: PushedImage) -> None:
    empty = store.fs_usage()
    store.pull(f"{registry.host}/busybox:1.0")

    usage = store.fs_usage()

    assert usage.used_bytes > empty.used_bytes + 1_000_000
    assert usage.inodes_used > empty.inodes_used + 10
    assert os.path.ismount(usage.mountpoint)


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("basic"), auth="htpasswd") as r:
        yield r


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("token"), auth="token") as r:
        yield r


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_private_registries_accept_the_right_credentials(
    request: pytest.FixtureRequest, mode: str, store: ImageStore, tmp_path: Path
) -> None:
    reg: Registry = request.getfixturevalue(f"{mode}_registry")
    image = push_image(reg, "private", "1", [unique_layer(tmp_path)])
    encoded = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()

    record = store.pull(f"{reg.host}/private:1", Auth(username=reg.username, password=reg.password))
    assert record.id == image.config_digest
    store.remove(record.id)
    assert store.pull(f"{reg.host}/private:1", Auth(auth=encoded)).id == image.config_digest
    if reg.token_server is not None:
        assert reg.token_server.requests >= 2


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_private_registries_refuse_wrong_or_missing_credentials(
    request: pytest.FixtureRequest, mode: str, store: ImageStore, tmp_path: Path
) -> None:
    reg: Registry = request.getfixturevalue(f"{mode}_registry")
    push_image(reg, "private", "2", [unique_layer(tmp_path)])

    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        store.pull(f"{reg.host}/private:2", Auth(username=reg.username, password="wrong"))
    with pytest.raises(RegistryAuthError):
        store.pull(f"{reg.host}/private:2")
    with pytest.raises(InvalidArgument, match="base64"):
        store.pull(f"{reg.host}/private:2", Auth(auth="not base64!"))
    assert_store_is_empty(store)


def test_a_ready_registry_token_is_used_as_is(store: ImageStore, token_registry: Registry, tmp_path: Path) -> None:
    image = push_image(token_registry, "private", "3", [unique_layer(tmp_path)])
    assert token_registry.issuer is not None
    token = token_registry.issuer.token("alice", ["repository:private:pull"])
    before = token_registry.token_server.requests if token_registry.token_server else 0

    record = store.pull(f"{token_registry.host}/private:3", Auth(registry_token=token))

    assert record.id == image.config_digest
    assert token_registry.token_server is not None and token_registry.token_server.requests == before


def bomb_layer(unpacked: int) -> Layer:
    """One file of ``unpacked`` zero bytes, gzip-compressed as it is streamed (about 1 MiB a GiB)."""
    info = tarfile.TarInfo("zeros")
    info.size = unpacked
    raw_hash, gz = hashlib.sha256(), zlib.compressobj(9, zlib.DEFLATED, 31)
    out = bytearray()
    chunk = b"\0" * (1 << 20)
    for part in [info.tobuf(format=tarfile.PAX_FORMAT)] + [chunk] * (unpacked >> 20) + [b"\0" * 1024 * 10]:
        raw_hash.update(part)
        out += gz.compress(part)
    out += gz.flush()
    return Layer(bytes(out), "sha256:" + raw_hash.hexdigest(), "application/vnd.oci.image.layer.v1.tar+gzip")


def limited_store(tmp_path: Path, **limits: int) -> ImageStore:
    return ImageStore(tmp_path / "limited", RegistryConfig(limits=ImageLimits(**limits)))


def test_a_compression_bomb_is_stopped_at_the_unpacked_limit(registry: Registry, tmp_path: Path) -> None:
    layer = bomb_layer(1 << 30)  # 1 GiB of zeros, about 1 MiB on the wire
    assert len(layer.blob) < 2 << 20
    push_image(registry, "bomb", "1", [layer])
    store = limited_store(tmp_path, max_unpacked_layer_bytes=64 << 20)
    with pytest.raises(LimitExceeded, match="max_unpacked_layer_bytes") as e:
        store.pull(f"{registry.host}/bomb:1")
    assert e.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert_store_is_empty(store)


def test_too_many_entries_a_huge_tar_header_and_a_huge_layer_are_refused(registry: Registry, tmp_path: Path) -> None:
    many = [tarfile.TarInfo(f"f{i}") for i in range(200_000)]
    push_image(registry, "many", "1", [make_layer(extra=many)])
    header = tarfile.TarInfo("pax")
    header.pax_headers = {"comment": "x" * (2 << 20)}
    push_image(registry, "header", "1", [make_layer(extra=[header])])
    store = limited_store(tmp_path, max_layer_entries=100_000)
    with pytest.raises(LimitExceeded, match="more than 100000 entries"):
        store.pull(f"{registry.host}/many:1")
    with pytest.raises(LimitExceeded, match="max_tar_header_bytes"):
        store.pull(f"{registry.host}/header:1")
    small = limited_store(tmp_path / "small", max_layer_bytes=1000)
    with pytest.raises(LimitExceeded, match="max_layer_bytes"):
        small.pull(f"{registry.host}/many:1")
    assert_store_is_empty(store)
    assert_store_is_empty(small)

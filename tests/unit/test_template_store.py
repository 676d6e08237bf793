"""Templates on disk: written atomically, loaded into a memfd nothing can write, checked against
their metadata and checksum, named by everything their state depends on."""

from __future__ import annotations

import fcntl
import json
import mmap
import os
from pathlib import Path

import pytest

from kvmsandbox.hypervisor.template_store import (
    SEALS,
    TemplateStore,
    TemplateUnusable,
    copy_data,
    new_memory,
    template_key,
)

MIB = 1 << 20
INPUTS = {"kernel": "1:2:3:4", "vcpus": "1", "memory_mib": "128"}


def built(store: TemplateStore, tmp_path: Path, key: str = "k1") -> int:
    """A template of 128 MiB whose guest wrote two pieces; returns the memfd it was built in."""
    memory = new_memory(128, key)
    os.pwrite(memory, b"kernel" * 1000, 0)
    os.pwrite(memory, b"agent" * 1000, 100 * MIB)
    state = tmp_path / f"state-{key}"
    state.write_bytes(b"QEVM" + b"\0" * 100)
    with store.locked():
        store.install(key, INPUTS, memory, 128, state)
    return memory


def test_install_then_load_gives_the_guests_memory_sealed_against_every_write(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    os.close(built(store, tmp_path))
    info = store.info("k1")
    assert info is not None and info.memory_mib == 128 and info.data_bytes < 2 * MIB
    loaded = store.load("k1")
    try:
        assert os.pread(loaded.memory_fd, 6, 0) == b"kernel"
        assert os.pread(loaded.memory_fd, 5, 100 * MIB) == b"agent"
        assert fcntl.fcntl(loaded.memory_fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        with pytest.raises(PermissionError):
            os.pwrite(loaded.memory_fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(loaded.memory_fd, 0)
        with pytest.raises(PermissionError):
            mmap.mmap(loaded.memory_fd, MIB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # What a clone's QEMU does: a private mapping, whose writes stay its own.
        private = mmap.mmap(loaded.memory_fd, MIB, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        private[0:6] = b"CLONE!"
        assert os.pread(loaded.memory_fd, 6, 0) == b"kernel"
        private.close()
        # Reopened by path (as QEMU opens /proc/self/fd/N), the seals still hold.
        again = os.open(f"/proc/self/fd/{loaded.memory_fd}", os.O_RDWR)
        with pytest.raises(PermissionError):
            os.pwrite(again, b"x", 0)
        os.close(again)
    finally:
        loaded.close()


def test_the_memory_file_keeps_its_holes(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    os.close(built(store, tmp_path))
    st = (store.path("k1") / "memory").stat()
    assert st.st_size == 128 * MIB and st.st_blocks * 512 < 4 * MIB


@pytest.mark.parametrize("damage", ["truncate", "flip", "state", "meta", "missing"])
def test_a_damaged_template_is_unusable_with_a_reason(tmp_path: Path, damage: str) -> None:
    store = TemplateStore(tmp_path / "templates")
    os.close(built(store, tmp_path))
    directory = store.path("k1")
    if damage == "truncate":
        os.truncate(directory / "memory", 64 * MIB)
    elif damage == "flip":
        with open(directory / "memory", "r+b") as f:
            f.seek(100 * MIB + 7)
            f.write(b"X")
    elif damage == "state":
        (directory / "state").write_bytes(b"")
    elif damage == "meta":
        (directory / "meta.json").write_bytes(b"{" * (1 << 20))
    else:
        (directory / "memory").unlink()
    with pytest.raises(TemplateUnusable, match="k1"):
        store.load("k1")


def test_huge_or_hostile_metadata_is_read_within_its_bound(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    (store.root / "k2").mkdir(parents=True)
    (store.root / "k2" / "meta.json").write_text(json.dumps({"inputs": [], "created_at": "x"}))
    assert store.info("k2") is None
    assert store.list() == ["k2"]


def test_a_link_in_place_of_the_memory_file_is_not_followed(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    os.close(built(store, tmp_path))
    (store.path("k1") / "memory").unlink()
    (store.path("k1") / "memory").symlink_to("/etc/passwd")
    with pytest.raises(TemplateUnusable, match="cannot open"):
        store.load("k1")


def test_remove_leaves_a_loaded_template_usable(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    os.close(built(store, tmp_path))
    loaded = store.load("k1")
    with store.locked():
        assert store.remove("k1") and not store.remove("k1")
    assert os.pread(loaded.memory_fd, 6, 0) == b"kernel"
    loaded.close()


def test_the_key_names_every_input() -> None:
    base = template_key(INPUTS)
    assert template_key(dict(INPUTS)) == base
    for name in INPUTS:
        assert template_key({**INPUTS, name: INPUTS[name] + "x"}) != base


def test_copy_data_copies_only_what_was_written(tmp_path: Path) -> None:
    src = new_memory(16, "src")
    dst = new_memory(16, "dst")
    os.pwrite(src, b"a" * 10, 5 * MIB)
    assert copy_data(src, dst, 16 * MIB) <= 64 << 10
    assert os.pread(dst, 10, 5 * MIB) == b"a" * 10
    os.close(src)
    os.close(dst)


def test_the_checksum_depends_on_content_not_on_how_zero_pages_are_stored(tmp_path: Path) -> None:
    import hashlib

    holes, zeros = tmp_path / "holes", tmp_path / "zeros"
    for path, fill in ((holes, False), (zeros, True)):
        with open(path, "wb") as f:
            f.truncate(8 * MIB)
            if fill:  # a file system that keeps zero pages as data
                f.write(bytes(8 * MIB))
            f.seek(3 * MIB)
            f.write(b"data")
    digests = []
    for path in (holes, zeros):
        digest = hashlib.sha256()
        fd, out = os.open(path, os.O_RDONLY), new_memory(8, "x")
        copy_data(fd, out, 8 * MIB, digest)
        assert os.pread(out, 4, 3 * MIB) == b"data"
        assert os.fstat(out).st_blocks * 512 <= 64 << 10  # zero pages stay holes in the copy
        os.close(fd)
        os.close(out)
        digests.append(digest.hexdigest())
    assert digests[0] == digests[1]


def test_a_clone_source_closes_its_fds_once(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    os.close(built(store, tmp_path))
    loaded = store.load("k1")
    source = loaded.source()
    assert source.memory_fd not in (loaded.memory_fd, loaded.state_fd)
    source.close()
    reused = os.open("/dev/null", os.O_RDONLY)  # may take a number the source had
    source.close()
    os.fstat(reused)  # still open: the second close closed nothing
    os.close(reused)
    loaded.close()


def test_templates_exist_only_for_the_configured_vcpu_counts(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kvmsandbox.config import Config, TemplateConfig
    from kvmsandbox.hypervisor.capabilities import QEMU_CAPABILITIES
    from kvmsandbox.sandbox.templates import Templates

    config = Config(state_dir=tmp_path, templates=TemplateConfig(vcpus=[1, 2]))
    ctx = SimpleNamespace(config=config, hypervisor=SimpleNamespace(capabilities=QEMU_CAPABILITIES, name="qemu"))
    templates = Templates(ctx)  # type: ignore[arg-type]
    with pytest.raises(TemplateUnusable, match="no template has 7 vCPUs"):
        templates.clone_source(7, 256)
    assert templates.memory_class(300) == 512 and templates.memory_class(4096) is None


def test_too_many_template_sizes_are_a_config_error() -> None:
    from kvmsandbox.config import ConfigError, TemplateConfig

    with pytest.raises(ConfigError, match=r"templates\.vcpus"):
        TemplateConfig(vcpus=list(range(1, 20)))


def test_the_state_clones_load_is_a_checked_sealed_copy(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "templates")
    os.close(built(store, tmp_path))
    state = store.path("k1") / "state"
    with open(state, "r+b") as f:
        f.write(b"X")  # same size, other bytes
    with pytest.raises(TemplateUnusable, match="state does not match its checksum"):
        store.load("k1")
    with open(state, "r+b") as f:
        f.write(b"Q")
    loaded = store.load("k1")
    state.write_bytes(b"rewritten after the load")
    clone_view = os.open(f"/proc/self/fd/{loaded.state_fd}", os.O_RDONLY)
    assert os.read(clone_view, 4) == b"QEVM"
    assert fcntl.fcntl(loaded.state_fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    os.close(clone_view)
    loaded.close()

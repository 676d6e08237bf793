"""Pure-logic tests of kvmsandbox.guest_image (no apt, no mmdebstrap, no VM)."""

from __future__ import annotations

import io
import json
import lzma
import os
import stat
import struct
from pathlib import Path

import pytest

from kvmsandbox.errors import GuestImageError
from kvmsandbox.guest_image import (
    BuildReport,
    GuestImage,
    apt,
    cpio,
    describe,
    find_guest_image,
    kernel,
    keys,
    modules,
    recipe,
    rootfs,
)
from kvmsandbox.guest_image.build import _load, _prune

FAKE_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/crypto/crc32c_generic.ko:
kernel/lib/libcrc32c.ko:
kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko
kernel/net/9p/9pnet.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def fake_index(builtin: str = "", softdep: str = "", alias: str = "") -> modules.ModuleIndex:
    paths, deps = modules.parse_modules_dep(FAKE_DEP)
    return modules.ModuleIndex(
        paths=paths,
        deps=deps,
        builtin=modules.parse_builtin(builtin),
        softdeps=modules.parse_softdeps(softdep),
        aliases=modules.parse_aliases(alias),
    )


def assert_dependencies_first(order: list[str], index: modules.ModuleIndex) -> None:
    for i, name in enumerate(order):
        for dep in index.deps[name]:
            if dep not in index.builtin:
                assert order.index(dep) < i, f"{dep} must load before {name}"


# --- module closure ---------------------------------------------------------------------------


def test_module_closure_puts_every_dependency_before_its_user() -> None:
    index = fake_index()
    order = modules.module_closure(["virtio_pci", "virtio_blk", "9p"], index)
    assert order == [
        "virtio_pci_modern_dev",
        "virtio_ring",
        "virtio",
        "virtio_pci",
        "virtio_blk",
        "9pnet",
        "netfs",
        "9p",
    ]
    assert_dependencies_first(order, index)


def test_module_closure_lists_each_module_once() -> None:
    order = modules.module_closure(["virtio_blk", "virtio_pci", "virtio_blk", "virtio"], fake_index())
    assert len(order) == len(set(order))


def test_module_closure_skips_builtin_modules_and_their_entries() -> None:
    index = fake_index(builtin="kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio.ko\n")
    order = modules.module_closure(["virtio_blk"], index)
    assert order == ["virtio_blk"]


def test_module_names_treat_dash_and_underscore_alike_and_drop_compression_suffixes() -> None:
    index = fake_index()
    assert modules.module_closure(["virtio-rng"], index)[-1] == "virtio_rng"
    assert index.paths["virtio_rng"] == "kernel/drivers/char/hw_random/virtio-rng.ko.xz"


def test_module_closure_rejects_an_unknown_module() -> None:
    with pytest.raises(GuestImageError, match="nosuch"):
        modules.module_closure(["nosuch"], fake_index())


def test_module_closure_reports_a_dependency_cycle() -> None:
    paths, _ = modules.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    index = modules.ModuleIndex(paths=paths, deps={"a": ("b",), "b": ("a",)})
    with pytest.raises(GuestImageError, match="cycle"):
        modules.module_closure(["a"], index)


def test_soft_dependency_on_a_module_name_loads_it_first() -> None:
    index = fake_index(softdep="softdep erofs pre: crc32c_generic post: netfs\n")
    assert modules.module_closure(["erofs"], index) == ["crc32c_generic", "libcrc32c", "erofs"]


def test_soft_dependency_on_an_alias_needs_an_earlier_provider() -> None:
    index = fake_index(
        softdep="softdep libcrc32c pre: crypto-crc32c\n",
        alias="alias crypto-crc32c crc32c_generic\nalias crypto-crc32c crc32c_intel\n",
    )
    with pytest.raises(GuestImageError, match="crc32c_generic, crc32c_intel"):
        modules.module_closure(["erofs"], index)
    assert modules.module_closure(["crc32c_generic", "erofs"], index) == ["crc32c_generic", "libcrc32c", "erofs"]


def test_soft_dependency_satisfied_by_a_builtin_alias_provider() -> None:
    paths, deps = modules.parse_modules_dep(FAKE_DEP)
    index = modules.ModuleIndex(
        paths=paths,
        deps=deps,
        builtin=frozenset({"crc32c_intel"}),
        softdeps={"libcrc32c": ("crypto-crc32c",)},
        aliases=modules.parse_aliases("", b"crc32c_intel.alias=crypto-crc32c\0crc32c_intel.license=GPL\0"),
    )
    assert modules.module_closure(["erofs"], index) == ["libcrc32c", "erofs"]


def test_soft_dependency_naming_nothing_is_ignored_like_modprobe_does() -> None:
    index = fake_index(softdep="softdep erofs pre: nothing-provides-this\n")
    assert modules.module_closure(["erofs"], index) == ["libcrc32c", "erofs"]


def test_recipe_modules_include_a_crc32c_provider_before_erofs() -> None:
    wanted = recipe.load_recipe().modules
    assert wanted.index("crc32c_generic") < wanted.index("erofs")


# --- keys ---------------------------------------------------------------------------------------


def make_source(root: Path) -> Path:
    (root / "images/guest").mkdir(parents=True)
    (root / "images/guest/recipe.yaml").write_text("suite: bookworm\n")
    (root / "images/guest/init").write_text("#!/bin/busybox sh\n")
    (root / "kvmsandbox/agent/guest").mkdir(parents=True)
    (root / "kvmsandbox/__init__.py").write_text('__version__ = "0"\n')
    (root / "kvmsandbox/agent/__init__.py").write_text("")
    (root / "kvmsandbox/agent/guest/__main__.py").write_text("print('agent')\n")
    (root / "kvmsandbox/cli.py").write_text("# host only\n")
    return root


def test_agent_code_change_changes_the_image_key_but_not_the_base_key(tmp_path: Path) -> None:
    root = make_source(tmp_path)
    base, image = keys.base_key(root), keys.image_key(root)
    (root / "kvmsandbox/agent/guest/__main__.py").write_text("print('agent v2')\n")
    assert keys.base_key(root) == base
    assert keys.image_key(root) != image


def test_recipe_change_changes_both_keys(tmp_path: Path) -> None:
    root = make_source(tmp_path)
    base, image = keys.base_key(root), keys.image_key(root)
    (root / "images/guest/init").write_text("#!/bin/busybox sh\necho changed\n")
    assert keys.base_key(root) != base
    assert keys.image_key(root) != image


def test_bytecode_and_host_only_modules_do_not_change_the_keys(tmp_path: Path) -> None:
    root = make_source(tmp_path)
    image = keys.image_key(root)
    (root / "kvmsandbox/agent/__pycache__").mkdir()
    (root / "kvmsandbox/agent/__pycache__/x.cpython-311.pyc").write_bytes(b"\0")
    (root / "kvmsandbox/cli.py").write_text("# host only, edited\n")
    assert keys.image_key(root) == image


def test_agent_files_are_the_package_init_and_the_agent_tree(tmp_path: Path) -> None:
    root = make_source(tmp_path)
    assert [rel for rel, _ in keys.agent_files(root)] == [
        "kvmsandbox/__init__.py",
        "kvmsandbox/agent/__init__.py",
        "kvmsandbox/agent/guest/__main__.py",
    ]


def test_protobuf_version_and_python_version_are_part_of_the_image_key(tmp_path: Path) -> None:
    agent = keys.agent_files(make_source(tmp_path))
    key = keys.image_key_of("b", agent, "7.36.2", "3.11")
    assert keys.image_key_of("b", agent, "7.36.3", "3.11") != key
    assert keys.image_key_of("b", agent, "7.36.2", "3.12") != key
    assert keys.image_key_of("c", agent, "7.36.2", "3.11") != key


def test_protobuf_files_cover_the_google_protobuf_package() -> None:
    version, files = keys.protobuf_files()
    assert version
    assert "google/protobuf/__init__.py" in dict(files)
    assert not any(rel.endswith(".pyc") for rel, _ in files)


def test_missing_agent_tree_is_a_guest_image_error(tmp_path: Path) -> None:
    root = make_source(tmp_path)
    (root / "kvmsandbox/agent/guest/__main__.py").unlink()
    (root / "kvmsandbox/agent/guest").rmdir()
    (root / "kvmsandbox/agent/__init__.py").unlink()
    (root / "kvmsandbox/agent").rmdir()
    with pytest.raises(GuestImageError, match="kvmsandbox/agent"):
        keys.image_key(root)


# --- cmdline and describe -----------------------------------------------------------------------


def image(tmp_path: Path) -> GuestImage:
    return GuestImage(
        key="0123456789abcdef",
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.img",
        rootfs=tmp_path / "root.erofs",
        kernel_version="6.1.0-56-amd64",
    )


def test_cmdline_has_the_console_panic_and_root_keys(tmp_path: Path) -> None:
    words = image(tmp_path).cmdline().split()
    assert "console=ttyS0" in words
    assert "panic=-1" in words
    assert "kvmsandbox.root=/dev/vda" in words
    assert "kvmsandbox.bare=1" not in words


def test_cmdline_bare_adds_the_bare_key(tmp_path: Path) -> None:
    assert "kvmsandbox.bare=1" in image(tmp_path).cmdline(bare=True).split()


def test_cmdline_appends_extra_arguments_last_in_order(tmp_path: Path) -> None:
    line = image(tmp_path).cmdline(extra=["kvmsandbox.debug=1", "kvmsandbox.exec=/bin/busybox,sh"])
    assert line.endswith(" kvmsandbox.debug=1 kvmsandbox.exec=/bin/busybox,sh")


@pytest.mark.parametrize("bad", ["", "two words", "a\nb"])
def test_cmdline_rejects_an_extra_argument_that_would_split(tmp_path: Path, bad: str) -> None:
    with pytest.raises(GuestImageError):
        image(tmp_path).cmdline(extra=[bad])


def test_describe_reports_a_build_with_sizes_in_mib(tmp_path: Path) -> None:
    sizes = {"kernel": 66 * 2**20, "initrd": 4 * 2**20, "rootfs": 96 * 2**20}
    text = describe(BuildReport(image=image(tmp_path), built=True, seconds=21.04, sizes=sizes))
    assert "built guest image 0123456789abcdef in 21.0 s" in text
    assert "96.0 MiB" in text
    assert str(tmp_path / "root.erofs") in text


def test_describe_reports_a_cache_hit(tmp_path: Path) -> None:
    text = describe(BuildReport(image=image(tmp_path), built=False, seconds=0.01, sizes={}))
    assert "cache hit" in text


# --- recipe -------------------------------------------------------------------------------------


def test_the_repository_recipe_parses_and_names_its_init_script() -> None:
    r = recipe.load_recipe()
    assert r.suite == "bookworm"
    assert "python3" in r.packages and "crun" in r.packages
    assert r.init_script.is_file()
    assert {"run", "tmp", "sys/fs/cgroup", "dev", "proc", "sys", "var/tmp"} <= set(r.mount_points)


def test_recipe_rejects_unknown_fields_and_absolute_paths(tmp_path: Path) -> None:
    good = (recipe.default_source_root() / "images/guest/recipe.yaml").read_text()
    with pytest.raises(GuestImageError, match="unknown field"):
        recipe.parse_recipe(good + "colour: blue\n", tmp_path)
    with pytest.raises(GuestImageError, match="relative"):
        recipe.parse_recipe(good.replace("  - usr/share/man/*", "  - /usr/share/man/*"), tmp_path)


# --- apt sources --------------------------------------------------------------------------------

DEB822 = """\
Types: deb
# a comment
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main contrib
Enabled: yes

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no
"""


def test_deb822_sources_yield_deb_entries_only() -> None:
    sources = apt.parse_deb822(DEB822)
    assert [s.uri for s in sources] == ["http://deb.debian.org/debian", "http://deb.debian.org/debian-security"]
    assert sources[0].signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"


def test_one_line_sources_parse_options_and_skip_comments() -> None:
    text = "# deb http://x/ bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main contrib\n"
    assert apt.parse_one_line(text) == [apt.AptSource("http://m/debian", ("bookworm",), ("main", "contrib"), "/k.gpg")]


def test_mirror_lines_take_each_suite_from_the_first_source_carrying_it() -> None:
    lines = apt.mirror_lines(
        apt.parse_deb822(DEB822), "bookworm", ["bookworm-updates", "bookworm-security", "bookworm-backports"], ["main"]
    )
    assert lines == [
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian "
        "bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_mirror_lines_fail_clearly_when_the_host_lacks_the_suite() -> None:
    with pytest.raises(GuestImageError, match="trixie"):
        apt.mirror_lines(apt.parse_deb822(DEB822), "trixie", [], ["main"])


def test_host_sources_read_list_and_sources_files_but_not_other_names(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb http://a/debian bookworm main\n")
    (tmp_path / "sources.list.d/b.sources").write_text(DEB822)
    (tmp_path / "sources.list.d/c.list.disabled").write_text("deb http://c/debian bookworm main\n")
    uris = [s.uri for s in apt.host_sources(tmp_path)]
    assert uris[0] == "http://a/debian"
    assert "http://c/debian" not in uris


def test_parse_depends_picks_the_kernel_image_package() -> None:
    out = "linux-image-amd64\n |Depends: linux-image-6.1.0-56-amd64\n  Depends: linux-image-6.1.0-56-amd64-unsigned\n"
    assert apt.parse_depends(out, "linux-image-") == "linux-image-6.1.0-56-amd64"
    assert apt.parse_depends("linux-image-amd64\n  Recommends: firmware\n", "linux-image-") is None


# --- initramfs archive --------------------------------------------------------------------------


def read_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    out: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) // 4 * 4
        if name == cpio.TRAILER:
            return out
        out.append((name, fields[1], data[data_start : data_start + filesize], fields[9], fields[10]))
        pos = (data_start + filesize + 3) // 4 * 4


def test_newc_archive_round_trips_files_links_and_device_nodes() -> None:
    buf = io.BytesIO()
    cpio.write_newc(
        buf,
        [
            cpio.directory("bin"),
            cpio.regular("bin/busybox", b"\x7fELF...", 0o755),
            cpio.symlink("bin/sh", "busybox"),
            cpio.char_device("dev/console", 5, 1),
            cpio.regular("init", b"#!/bin/busybox sh\n", 0o755),
        ],
    )
    entries = read_newc(buf.getvalue())
    assert [e[0] for e in entries] == ["bin", "bin/busybox", "bin/sh", "dev/console", "init"]
    assert entries[1][1] == stat.S_IFREG | 0o755 and entries[1][2] == b"\x7fELF..."
    assert stat.S_ISLNK(entries[2][1]) and entries[2][2] == b"busybox"
    assert stat.S_ISCHR(entries[3][1]) and entries[3][3:] == (5, 1)
    assert len(buf.getvalue()) % 4 == 0


def test_newc_archive_refuses_absolute_paths() -> None:
    with pytest.raises(ValueError):
        cpio.write_newc(io.BytesIO(), [cpio.directory("/bin")])


# --- kernel -------------------------------------------------------------------------------------


def fake_elf(with_pvh_note: bool) -> bytes:
    note_type = 18 if with_pvh_note else 6
    note = struct.pack("<III", 4, 4, note_type) + b"Xen\0" + b"\0\0\0\1"
    phoff = 64
    note_offset = phoff + 56
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, 56, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, note_offset, 0, 0, len(note), len(note), 4)
    return bytes(header) + phdr + note


def fake_bzimage(payload: bytes) -> bytes:
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 16, len(payload))
    return bytes(image) + b"\0" * 16 + payload + b"trailing"


def test_vmlinux_is_extracted_from_an_xz_bzimage_and_its_pvh_note_found() -> None:
    elf = fake_elf(with_pvh_note=True)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    extracted = kernel.extract_vmlinux(fake_bzimage(payload))
    assert extracted == elf
    assert kernel.has_pvh_entry(extracted)


def test_an_elf_without_the_pvh_note_is_recognised() -> None:
    assert not kernel.has_pvh_entry(fake_elf(with_pvh_note=False))


def test_a_file_that_is_not_a_bzimage_is_rejected() -> None:
    with pytest.raises(GuestImageError, match="HdrS"):
        kernel.extract_vmlinux(b"\0" * 4096)


# --- tree stripping and the cache ---------------------------------------------------------------


def test_strip_keeps_copyright_files_and_removes_the_rest(tmp_path: Path) -> None:
    doc = tmp_path / "usr/share/doc/bash"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("GPL")
    (doc / "changelog.gz").write_bytes(b"x" * 10)
    (tmp_path / "usr/share/doc/empty").mkdir()
    (tmp_path / "usr/share/man/man1").mkdir(parents=True)
    (tmp_path / "usr/share/man/man1/ls.1.gz").write_bytes(b"y" * 5)
    freed = rootfs.strip_tree(tmp_path, ["usr/share/doc/*", "usr/share/man/*"], ["usr/share/doc/*/copyright"])
    assert freed == 15
    assert (doc / "copyright").is_file()
    assert not (doc / "changelog.gz").exists()
    assert not (tmp_path / "usr/share/doc/empty").exists()
    assert list((tmp_path / "usr/share/man").iterdir()) == []


def write_image_dir(directory: Path, key: str) -> None:
    directory.mkdir(parents=True)
    for name in ("vmlinux", "initrd.img", "root.erofs"):
        (directory / name).write_bytes(b"x")
    manifest = {"key": key, "kernel_version": "6.1.0-56-amd64", "kernel_file": "vmlinux", "sizes": {}}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_an_image_directory_counts_only_when_complete(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "k1", "k1")
    found = _load(tmp_path / "k1", "k1")
    assert found is not None and found[0].kernel == tmp_path / "k1/vmlinux"
    (tmp_path / "k1/root.erofs").unlink()
    assert _load(tmp_path / "k1", "k1") is None
    assert _load(tmp_path / "absent", "absent") is None


def test_find_guest_image_in_an_empty_cache_is_none(tmp_path: Path) -> None:
    assert find_guest_image(tmp_path) is None


def test_prune_keeps_the_current_and_the_newest_others(tmp_path: Path) -> None:
    for i, key in enumerate(["old", "older", "current", "newest"]):
        write_image_dir(tmp_path / key, key)
        os.utime(tmp_path / key, (1000 + i, {"older": 1, "old": 2, "current": 3, "newest": 4}[key]))
    (tmp_path / ".tmp-building-1").mkdir()
    _prune(tmp_path, 2, "current")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-building-1", "current", "newest"]

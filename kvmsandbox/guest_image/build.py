"""Builds the guest image in two cached layers, atomically; finds a complete one.

Cache layout below ``cache_dir``::

    .lock                          flock held while building (one builder at a time)
    base/<base_key>/               recipe layer (images/guest/ + BUILDER_VERSION)
        tree/                      mmdebstrap tree, stripped, stdlib byte-compiled
        vmlinux  initrd.img        kernel (PVH ELF; vmlinuz if the recipe says bzimage) and
                                   initramfs (busybox + modules + /init)
        base.json                  kernel version, modules, guest python, mirrors, timings
    images/<image_key>/            final layer (base key + agent code + protobuf + python)
        vmlinux  initrd.img        hard links to the base layer's files
        root.erofs                 base tree + /opt/kvmsandbox (agent, protobuf, bytecode)
        manifest.json              key, kernel version, sizes, build seconds

Each layer is built in ``.tmp-<key>-<pid>`` beside its final directory and renamed into place, so a
directory named by a key is always complete: an interrupted build leaves only a ``.tmp-*`` directory,
removed by the next build. An agent change only rebuilds ``images/<key>`` (seconds: a hard-link copy
of the tree, the agent's bytecode and mkfs.erofs).
"""

from __future__ import annotations

import compileall
import contextlib
import fcntl
import json
import os
import py_compile
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvmsandbox.errors import GuestImageError
from kvmsandbox.guest_image import apt, initramfs, kernel, rootfs
from kvmsandbox.guest_image.image import BuildReport, GuestImage
from kvmsandbox.guest_image.keys import (
    agent_files,
    base_key_of,
    host_python,
    image_key,
    image_key_of,
    protobuf_files,
    recipe_files,
)
from kvmsandbox.guest_image.recipe import Recipe, default_source_root, load_recipe

BASE_DIR = "base"
IMAGES_DIR = "images"
KERNEL_FILES = {"pvh-elf": "vmlinux", "bzimage": "vmlinuz"}
INITRD = "initrd.img"
ROOTFS = "root.erofs"
TREE = "tree"
BASE_MANIFEST = "base.json"
MANIFEST = "manifest.json"
GUEST_PREFIX = "opt/kvmsandbox"
"""Where the agent code and protobuf go in the guest (PYTHONPATH set by /init)."""
KEEP_IMAGES = 3
KEEP_BASES = 2
"""Older layers beyond these counts are deleted after a build (running VMs keep their open files)."""


def _load(directory: Path, key: str) -> tuple[GuestImage, dict[str, Any]] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    image = GuestImage(
        key=key,
        kernel=directory / str(manifest.get("kernel_file", "")),
        initrd=directory / INITRD,
        rootfs=directory / ROOTFS,
        kernel_version=str(manifest.get("kernel_version", "")),
    )
    if manifest.get("key") != key or not all(p.is_file() for p in (image.kernel, image.initrd, image.rootfs)):
        return None
    return image, manifest


def find_guest_image(cache_dir: Path) -> GuestImage | None:
    """The image for the current recipe and agent code if it is complete in ``cache_dir``, else None.

    Raises:
        GuestImageError: the recipe or agent code is missing, or protobuf is not installed.
    """
    key = image_key()
    found = _load(cache_dir / IMAGES_DIR / key, key)
    return found[0] if found else None


@contextlib.contextmanager
def _lock(cache_dir: Path, progress: Callable[[str], None]) -> Iterator[None]:
    with open(cache_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another guest image build in {cache_dir}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _replace(stage: Path, final: Path) -> None:
    """Renames a finished stage into place (replacing an older build of the same key)."""
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        final.rename(old)
        stage.rename(final)
        rootfs.remove_tree(old)
    else:
        stage.rename(final)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _tree_bytes(tree: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _build_base(recipe: Recipe, base_key: str, final: Path, say: Callable[[str], None]) -> dict[str, Any]:
    start = time.monotonic()
    stage = final.with_name(f".tmp-{base_key}-{os.getpid()}")
    rootfs.remove_tree(stage)
    stage.mkdir(parents=True)
    work = stage / "work"
    work.mkdir()
    parts, busybox = kernel.fetch(recipe, work, say)
    say(
        f"kernel {parts.version} ({parts.package} {parts.package_version}), "
        f"{len(parts.modules)} modules: {' '.join(name for name, _ in parts.modules)}"
    )
    kernel_file = KERNEL_FILES[recipe.kernel_format]
    kernel.write_kernel(parts.vmlinuz, stage / kernel_file, recipe.kernel_format)
    members = initramfs.entries(recipe.init_script.read_bytes(), parts, busybox)
    initramfs.write_initramfs(stage / INITRD, members, recipe.initramfs_compression)
    kernel_seconds = time.monotonic() - start

    mirrors = apt.mirror_lines(apt.host_sources(), recipe.suite, recipe.update_suites, recipe.components)
    tree_start = time.monotonic()
    facts = rootfs.build_base_tree(recipe, stage / TREE, mirrors, say)
    tree_seconds = time.monotonic() - tree_start
    rootfs.remove_tree(work)
    manifest = {
        "base_key": base_key,
        "kernel_version": parts.version,
        "kernel_package": parts.package,
        "kernel_package_version": parts.package_version,
        "kernel_file": kernel_file,
        "busybox_package_version": busybox.package_version,
        "modules": [name for name, _ in parts.modules],
        "suite": recipe.suite,
        "packages": list(recipe.packages),
        "mirrors": mirrors,
        **facts,
        "tree_bytes": _tree_bytes(stage / TREE),
        "kernel_initramfs_seconds": round(kernel_seconds, 1),
        "tree_seconds": round(tree_seconds, 1),
        "seconds": round(time.monotonic() - start, 1),
    }
    (stage / BASE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _replace(stage, final)
    say(f"base layer {base_key} built in {manifest['seconds']} s")
    return manifest


def _load_base(directory: Path) -> dict[str, Any] | None:
    try:
        manifest: dict[str, Any] = json.loads((directory / BASE_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    names = (str(manifest.get("kernel_file", "")), INITRD, TREE)
    complete = all(name and (directory / name).exists() for name in names)
    return manifest if complete else None


def _copy_files(files: list[tuple[str, Path]], dest: Path) -> None:
    for rel, src in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        target.chmod(0o644 if not os.access(src, os.X_OK) else 0o755)


# Run in the finished tree: the agent must import with the guest's own Python and libraries, and
# protobuf must use its C (upb) implementation; the pure-Python fallback costs the guest about a
# second of boot under TCG and it is chosen silently when a shared library is missing.
AGENT_IMPORT_CHECK = (
    "from google.protobuf.internal import api_implementation as impl\n"
    "import kvmsandbox.agent.guest.main\n"
    "assert impl.Type() == 'upb', f'protobuf uses its {impl.Type()} implementation, not upb'\n"
)


def _check_agent_imports(tree: Path) -> None:
    """Raises GuestImageError when the agent cannot be imported in the guest tree as it boots."""
    rootfs.run(
        [
            "chroot",
            str(tree),
            "/usr/bin/env",
            f"PYTHONPATH=/{GUEST_PREFIX}",
            "/usr/bin/python3",
            "-S",
            "-c",
            AGENT_IMPORT_CHECK,
        ],
        "importing the agent with the guest's Python",
    )


def _compile_guest_code(tree: Path, guest_python: str) -> None:
    """Byte-compiles /opt/kvmsandbox for the guest's Python, recording guest paths in the bytecode.

    unchecked-hash bytecode is used without looking at the source's mtime, which the read-only
    root would never let Python refresh anyway.
    """
    target = tree / GUEST_PREFIX
    if guest_python == host_python():
        ok = compileall.compile_dir(
            str(target),
            quiet=1,
            stripdir=str(tree),
            prependdir="/",
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        if not ok:
            raise GuestImageError(f"byte-compiling {target} failed (syntax error in the agent code?)")
        return
    # Another Python on the host: let the guest's own interpreter do it.
    rootfs.run(
        [
            "chroot",
            str(tree),
            "/usr/bin/python3",
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "unchecked-hash",
            f"/{GUEST_PREFIX}",
        ],
        "byte-compiling the agent code with the guest python",
    )


def _build_image(
    recipe: Recipe,
    base_dir: Path,
    base: dict[str, Any],
    key: str,
    final: Path,
    code: tuple[list[tuple[str, Path]], str, list[tuple[str, Path]]],
    say: Callable[[str], None],
) -> dict[str, Any]:
    agent, protobuf_version, protobuf = code
    start = time.monotonic()
    stage = final.with_name(f".tmp-{key}-{os.getpid()}")
    rootfs.remove_tree(stage)
    stage.mkdir(parents=True)
    tree = stage / TREE
    say(f"image {key}: agent code ({len(agent)} files) + protobuf {protobuf_version} -> /{GUEST_PREFIX}")
    rootfs.hardlink_copy(base_dir / TREE, tree)
    _copy_files(agent, tree / GUEST_PREFIX)
    _copy_files(protobuf, tree / GUEST_PREFIX)
    _compile_guest_code(tree, str(base["guest_python"]))
    _check_agent_imports(tree)
    say(f"mkfs.erofs ({recipe.erofs_compression} compression)")
    rootfs.make_erofs(tree, stage / ROOTFS, recipe.erofs_compression)
    rootfs.remove_tree(tree)
    kernel_file = str(base["kernel_file"])
    for name in (kernel_file, INITRD):
        _link_or_copy(base_dir / name, stage / name)
    sizes = {
        "kernel": (stage / kernel_file).stat().st_size,
        "initrd": (stage / INITRD).stat().st_size,
        "rootfs": (stage / ROOTFS).stat().st_size,
    }
    manifest = {
        "key": key,
        "base_key": base["base_key"],
        "kernel_version": base["kernel_version"],
        "kernel_package": base["kernel_package"],
        "kernel_package_version": base["kernel_package_version"],
        "kernel_file": kernel_file,
        "modules": base["modules"],
        "guest_python": base["guest_python"],
        "protobuf_version": protobuf_version,
        "agent_files": [rel for rel, _ in agent],
        "initramfs_compression": recipe.initramfs_compression,
        "erofs_compression": recipe.erofs_compression,
        "sizes": sizes,
        "base_tree_bytes": base.get("tree_bytes"),
        "base_build_seconds": base["seconds"],
        "image_build_seconds": round(time.monotonic() - start, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _replace(stage, final)
    return manifest


def _clean_stale(cache_dir: Path) -> None:
    """Removes what interrupted builds left (called with the lock held: no build is running)."""
    for layer in (BASE_DIR, IMAGES_DIR):
        directory = cache_dir / layer
        if directory.is_dir():
            for stale in directory.glob(".tmp-*"):
                rootfs.remove_tree(stale)


def _prune(layer_dir: Path, keep: int, current: str) -> None:
    """Deletes all but the ``keep`` most recently built directories of a layer (never ``current``)."""
    entries = [p for p in layer_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    kept = 1
    for p in entries:
        if p.name == current:
            continue
        if kept < keep:
            kept += 1
        else:
            rootfs.remove_tree(p)


def build_guest_image(
    cache_dir: Path, *, force: bool = False, progress: Callable[[str], None] | None = None
) -> BuildReport:
    """Builds (or finds) the guest image for the current recipe and agent code in ``cache_dir``.

    Idempotent: a complete image for the current key is returned as is (``built=False``) unless
    ``force``, which rebuilds both layers. Only the layers whose key changed are built.

    Raises:
        GuestImageError: the recipe or agent code is missing, apt cannot find the kernel (no package
            lists?), mmdebstrap or another build tool failed, not root when the base layer must be
            built, or the tree lacks what the agent needs.
    """
    start = time.monotonic()
    say = progress or (lambda _message: None)
    source_root = default_source_root()
    recipe = load_recipe(source_root)
    bkey = base_key_of(recipe_files(source_root))
    protobuf_version, protobuf = protobuf_files()
    agent = agent_files(source_root)
    key = image_key_of(bkey, agent, protobuf_version, host_python())
    final = cache_dir / IMAGES_DIR / key

    def report(found: tuple[GuestImage, dict[str, Any]], built: bool) -> BuildReport:
        image, manifest = found
        sizes = {k: int(v) for k, v in manifest.get("sizes", {}).items()}
        return BuildReport(image=image, built=built, seconds=time.monotonic() - start, sizes=sizes)

    if not force and (found := _load(final, key)):
        return report(found, built=False)
    try:
        (cache_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (cache_dir / BASE_DIR).mkdir(parents=True, exist_ok=True)
        with _lock(cache_dir, say):
            if not force and (found := _load(final, key)):
                return report(found, built=False)
            _clean_stale(cache_dir)
            base_dir = cache_dir / BASE_DIR / bkey
            try:
                base = None if force else _load_base(base_dir)
                if base is None:
                    base = _build_base(recipe, bkey, base_dir, say)
                else:
                    say(f"base layer {bkey} cached (kernel {base['kernel_version']})")
                _build_image(recipe, base_dir, base, key, final, (agent, protobuf_version, protobuf), say)
            except BaseException:
                # Failed or interrupted: drop the half-built stage now rather than at the next build.
                with contextlib.suppress(Exception):
                    _clean_stale(cache_dir)
                raise
            _prune(cache_dir / IMAGES_DIR, KEEP_IMAGES, key)
            _prune(cache_dir / BASE_DIR, KEEP_BASES, bkey)
    except OSError as e:
        raise GuestImageError(f"building the guest image in {cache_dir} failed: {e}") from None
    found = _load(final, key)
    if found is None:
        raise GuestImageError(f"the guest image {final} is incomplete right after its build")
    return report(found, built=True)

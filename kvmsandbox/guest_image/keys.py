"""Cache keys of the two layers, and the exact file sets they cover.

The base key covers the recipe directory (``images/guest/``) and the builder's layout version: it names
the mmdebstrap tree, the kernel and the initramfs. The image key adds the agent code, the protobuf
runtime version and the Python version that compiles them: it names root.erofs. Keys hash what is
copied, so a file that changes the image always changes the key.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from collections.abc import Iterable
from pathlib import Path

from kvmsandbox.errors import GuestImageError
from kvmsandbox.guest_image.recipe import RECIPE_DIR, default_source_root

BUILDER_VERSION = "1"
"""Bumped by hand when the build steps or the cache layout change in a way the recipe does not show."""

KEY_LENGTH = 16
"""Hex digits kept from the sha256 (64 bits: collisions are not a concern for a local cache)."""

AGENT_ROOTS = ("kvmsandbox/__init__.py", "kvmsandbox/agent")
"""What of the source tree goes into the guest, relative to the source root."""


def _wanted(path: Path) -> bool:
    return "__pycache__" not in path.parts and path.suffix != ".pyc"


def tree_files(root: Path, entries: Iterable[str]) -> list[tuple[str, Path]]:
    """The regular files under each entry (a file or a directory below ``root``), as sorted
    (relative path, absolute path) pairs; ``__pycache__`` and ``.pyc`` are left out.

    Raises:
        GuestImageError: an entry does not exist.
    """
    found: dict[str, Path] = {}
    for entry in entries:
        top = root / entry
        if top.is_file():
            candidates = [top]
        elif top.is_dir():
            candidates = [p for p in top.rglob("*") if p.is_file() and not p.is_symlink()]
        else:
            raise GuestImageError(f"{top} is missing: the guest image needs it")
        for p in candidates:
            rel = p.relative_to(root)
            if _wanted(rel):
                found[rel.as_posix()] = p
    return sorted(found.items())


def agent_files(source_root: Path) -> list[tuple[str, Path]]:
    """The agent code copied into the guest under /opt/kvmsandbox.

    Raises:
        GuestImageError: the source tree has no ``kvmsandbox/agent``.
    """
    return tree_files(source_root, AGENT_ROOTS)


def recipe_files(source_root: Path) -> list[tuple[str, Path]]:
    """Every file of the recipe directory (``images/guest/``).

    Raises:
        GuestImageError: the recipe directory is missing.
    """
    return tree_files(source_root, [RECIPE_DIR.as_posix()])


def protobuf_files() -> tuple[str, list[tuple[str, Path]]]:
    """The installed protobuf runtime: its version and its files below ``google/`` (the pure Python
    package and the upb extension, ``google/_upb``), as (path relative to site-packages, path) pairs.

    Raises:
        GuestImageError: protobuf is not installed in this interpreter's environment.
    """
    try:
        dist = importlib.metadata.distribution("protobuf")
    except importlib.metadata.PackageNotFoundError:
        raise GuestImageError("the protobuf package is not installed: the guest agent needs it") from None
    files: dict[str, Path] = {}
    for f in dist.files or ():
        rel = Path(f)
        if rel.parts[:1] == ("google",) and _wanted(rel):
            files[rel.as_posix()] = Path(str(f.locate()))
    if not any(rel.startswith("google/protobuf/") for rel in files):
        raise GuestImageError(f"protobuf {dist.version} lists no google/protobuf files (broken install?)")
    return dist.version, sorted(files.items())


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:KEY_LENGTH]


def _file_parts(files: list[tuple[str, Path]]) -> Iterable[bytes]:
    for rel, path in files:
        yield rel.encode()
        try:
            yield path.read_bytes()
        except OSError as e:
            raise GuestImageError(f"cannot read {path}: {e.strerror}") from None


def base_key_of(recipe: list[tuple[str, Path]]) -> str:
    """The base layer's key from the recipe files.

    Raises:
        GuestImageError: a file cannot be read.
    """
    return _digest([b"base", BUILDER_VERSION.encode(), *_file_parts(recipe)])


def image_key_of(base_key: str, agent: list[tuple[str, Path]], protobuf_version: str, python: str) -> str:
    """The final image's key from the base key, the agent files, the protobuf version and the
    ``major.minor`` of the Python that byte-compiles them.

    Raises:
        GuestImageError: a file cannot be read.
    """
    head = [b"image", base_key.encode(), protobuf_version.encode(), python.encode()]
    return _digest([*head, *_file_parts(agent)])


def host_python() -> str:
    """``major.minor`` of this interpreter (the one that byte-compiles the agent code)."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def base_key(source_root: Path | None = None) -> str:
    """The base layer's key for the recipe in ``source_root`` (default: this source tree).

    Raises:
        GuestImageError: the recipe directory is missing or unreadable.
    """
    return base_key_of(recipe_files(source_root or default_source_root()))


def image_key(source_root: Path | None = None) -> str:
    """The final image's key: recipe (``images/``) + agent code + protobuf version.

    Raises:
        GuestImageError: the recipe or agent code is missing, or protobuf is not installed.
    """
    root = source_root or default_source_root()
    version, _ = protobuf_files()
    return image_key_of(base_key(root), agent_files(root), version, host_python())

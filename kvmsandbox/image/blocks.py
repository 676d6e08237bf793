"""Image layers as read-only erofs images, the form the guest gets them in (a SCSI disk each).

A layer's image sits next to its unpacked directory (``<layer dir>.erofs``, mode 0600), made
once: a layer directory is immutable once unpacked. The image store deletes it with the layer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import threading
from pathlib import Path

from kvmsandbox.errors import FailedPrecondition, InvalidArgument

EROFS_SUFFIX = ".erofs"
MKFS_TIMEOUT = 600.0  # seconds


def layer_of(path: Path) -> str:
    """The layer directory name a file next to the layers belongs to (its erofs image, or one
    being made: ``.<name>.<random>.tmp``); the name itself for a layer directory."""
    name = path.name
    if name.startswith(".") and name.endswith(".tmp"):
        return name[1:].split(".", 1)[0]
    return name.removesuffix(EROFS_SUFFIX)


def erofs_image(layer_dir: Path) -> Path:
    """The erofs image of an unpacked layer (``<layer_dir>.erofs``), made on first use. A layer
    directory is immutable once a container used it: the image is never remade. Made under a lock
    per image, so concurrent first uses build it once.

    Raises:
        InvalidArgument: the layer directory does not exist.
        FailedPrecondition: mkfs.erofs failed (its words in the message).
    """
    image = layer_dir.with_name(layer_dir.name + EROFS_SUFFIX)
    if image.is_file():
        return image
    if not layer_dir.is_dir():
        raise InvalidArgument(f"image layer {layer_dir} does not exist")
    with _lock_for(str(image)):  # two containers of a new image: one build, the other waits
        if image.is_file():
            return image
        _build(layer_dir, image)
    return image


_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


def _lock_for(key: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(key, threading.Lock())


def _build(layer_dir: Path, image: Path) -> None:
    tmp = layer_dir.with_name(f".{layer_dir.name}.{secrets.token_hex(4)}.tmp")
    # --preserve-mtime: files keep the layer's times; owners, modes, xattrs (overlay whiteouts and
    # opaque dirs), device nodes and links are copied as they are, never opened or followed.
    argv = ["mkfs.erofs", "--quiet", "--preserve-mtime", str(tmp), str(layer_dir)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=MKFS_TIMEOUT, check=False)
        if result.returncode != 0:
            raise FailedPrecondition(
                f"cannot make the erofs image of layer {layer_dir}: {result.stderr.strip()[-500:]}"
            )
        os.chmod(tmp, 0o600)
        # Durable before it has its name: an image that exists is never made again.
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, image)
        dfd = os.open(image.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FailedPrecondition(f"cannot make the erofs image of layer {layer_dir}: {e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

"""Image layers as read-only erofs images, the form the guest gets them in (a SCSI disk each).

A layer's image sits next to its unpacked directory (``<layer dir>.erofs``, mode 0600), made
once: a layer directory is immutable once unpacked. The image store deletes it with the layer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
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
    directory is immutable once a container used it: the image is never remade.

    Raises:
        InvalidArgument: the layer directory does not exist.
        FailedPrecondition: mkfs.erofs failed (its words in the message).
    """
    image = layer_dir.with_name(layer_dir.name + EROFS_SUFFIX)
    if image.is_file():
        return image
    if not layer_dir.is_dir():
        raise InvalidArgument(f"image layer {layer_dir} does not exist")
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
        os.rename(tmp, image)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FailedPrecondition(f"cannot make the erofs image of layer {layer_dir}: {e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return image

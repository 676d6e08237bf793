"""The initramfs: static busybox, the kernel modules in load order, and images/guest/init.

Layout inside the archive::

    /init                       the recipe's init script
    /bin/busybox, /bin/<applet> every applet as a symlink to busybox (PATH=/bin in /init)
    /dev/console                so the kernel can give /init a console before devtmpfs is mounted
    /lib/modules/<name>.ko      flat, decompressed
    /lib/modules/load-order     module names, one a line, dependencies first
    /proc /sys /newroot         mount points
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from kvmsandbox.guest_image import cpio
from kvmsandbox.guest_image.kernel import Busybox, KernelParts, read_module

LOAD_ORDER = "lib/modules/load-order"


def entries(init_script: bytes, kernel: KernelParts, busybox: Busybox) -> list[cpio.Entry]:
    """The archive members, parents first.

    Raises:
        GuestImageError: a module cannot be read.
        OSError: the busybox binary cannot be read.
    """
    members = [cpio.directory(d) for d in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys")]
    members.append(cpio.char_device("dev/console", 5, 1))
    members.append(cpio.regular("bin/busybox", busybox.binary.read_bytes(), 0o755))
    members += [cpio.symlink(f"bin/{a}", "busybox") for a in sorted(set(busybox.applets) - {"busybox"})]
    for name, path in kernel.modules:
        members.append(cpio.regular(f"lib/modules/{name}.ko", read_module(path)))
    members.append(cpio.regular(LOAD_ORDER, "".join(f"{name}\n" for name, _ in kernel.modules).encode()))
    members.append(cpio.regular("init", init_script, 0o755))
    return members


def write_initramfs(out: Path, members: list[cpio.Entry], compression: str) -> None:
    """Writes the newc archive, gzip-compressed when ``compression`` is ``gzip``.

    Raises:
        OSError: writing failed.
    """
    buf = io.BytesIO()
    cpio.write_newc(buf, members)
    data = buf.getvalue()
    if compression == "gzip":
        data = gzip.compress(data, compresslevel=9, mtime=0)
    out.write_bytes(data)

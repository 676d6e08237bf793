"""A minimal container root filesystem from the host's static busybox (the busybox-static package).

Used by the demo and the tests as an image layer until images come from registries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from kvmsandbox.errors import FailedPrecondition
from kvmsandbox.image.blocks import EROFS_SUFFIX

BUSYBOX = Path("/bin/busybox")


def make_busybox_rootfs(dest: Path, busybox: Path = BUSYBOX) -> Path:
    """Writes a busybox rootfs into ``dest`` (replaced atomically if it exists) and returns it.

    Raises:
        FailedPrecondition: no static busybox on the host.
    """
    if not busybox.is_file():
        raise FailedPrecondition(f"{busybox} is missing: install the busybox-static package")
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "tmp",
        "root",
        "proc",
        "sys",
        "dev",
        "var",
        "home",
    ):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, tmp / "bin" / "busybox")
    for applet in applets:
        link = tmp / applet
        if applet != "bin/busybox" and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
    (tmp / "tmp").chmod(0o1777)
    (tmp / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (tmp / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    # A layer's erofs image stands for the directory it was made from: this is a new one.
    dest.with_name(dest.name + EROFS_SUFFIX).unlink(missing_ok=True)
    return dest

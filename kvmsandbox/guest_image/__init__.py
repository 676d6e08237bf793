"""The guest image: Debian's kernel, a busybox initramfs and a read-only erofs root with the agent.

Built from the recipe in ``images/guest/`` (``recipe.yaml`` and the initramfs ``init`` script) by
:func:`build_guest_image` into a cache directory chosen by the caller (layout: :mod:`.build`).
Boot it with ``kernel`` (an uncompressed PVH ELF: QEMU's ``-kernel`` enters it directly), ``initrd``,
:meth:`GuestImage.cmdline` and ``rootfs`` as the first virtio-blk disk, read-only. Give the VM a
virtio-rng device if you can: without one the guest's first /dev/urandom read (Python's hash seed)
waits ~1 s for jitter entropy under TCG.

/init prints ``kvmsandbox-init: reached init uptime=<secs>`` as soon as it runs, loads the modules,
mounts the root and switch_roots into ``/usr/bin/python3 -S -u -m kvmsandbox.agent.guest`` with
PYTHONPATH=/opt/kvmsandbox. Kernel command line keys it reads (pass them as ``cmdline(extra=...)``):

``kvmsandbox.root=DEV``
    root device (default ``/dev/vda``); a later key overrides an earlier one.
``kvmsandbox.bare=1``
    print the init marker and power off at once (the boot benchmark floor; ``cmdline(bare=True)``).
``kvmsandbox.exec=PROG[,ARG...]``
    debugging: after switch_root run PROG with the comma-separated ARGs instead of the agent, e.g.
    ``kvmsandbox.exec=/usr/bin/python3,-S,-c,pass`` or, with an interactive serial console,
    ``kvmsandbox.exec=/bin/busybox,sh``. No spaces (the kernel would split the argument). When PROG
    exits the kernel panics and, with ``panic=-1`` and QEMU's -no-reboot, the VM ends.
``kvmsandbox.debug=1``
    print each module load with its uptime, then /proc/modules and /proc/mounts before switch_root.

A root device that never appears (10 s) or does not mount prints ``kvmsandbox-init: error: ...`` and
powers the VM off.
"""

from kvmsandbox.guest_image.build import build_guest_image, find_guest_image
from kvmsandbox.guest_image.image import KERNEL_ARGS, BuildReport, GuestImage, describe
from kvmsandbox.guest_image.keys import base_key, image_key

__all__ = [
    "KERNEL_ARGS",
    "BuildReport",
    "GuestImage",
    "base_key",
    "build_guest_image",
    "describe",
    "find_guest_image",
    "image_key",
]

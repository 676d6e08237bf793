"""What a built guest image is (GuestImage, BuildReport), its kernel command line, and its summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.errors import GuestImageError

ROOT_DEVICE = "/dev/vda"
"""The root image is the first virtio-blk disk."""

KERNEL_ARGS: tuple[str, ...] = (
    "console=ttyS0",
    # A guest kernel panic reboots at once, and QEMU runs with -no-reboot / on_reboot=destroy: the VM ends.
    "panic=-1",
    # Every console byte is an emulated UART write (slow under TCG); errors still show.
    "quiet",
    "loglevel=3",
    # No keyboard or mouse behind the i8042 controller q35 always has: skip probing them.
    "i8042.noaux",
    "i8042.nokbd",
    "i8042.nopnp",
    # The crypto self-tests run at every algorithm registration; they proved the code on the build farm.
    "cryptomgr.notests",
    # Under TCG the TSC looks unstable to the kernel's watchdog; trusting it avoids a clocksource switch.
    "tsc=reliable",
    "no_timer_check",
)
"""Kernel arguments common to every boot (boot parameters are not part of the image key). Under TCG
they bring /init from 1.6-1.8 s of guest uptime (``console=ttyS0 panic=-1`` alone) to 1.4-1.5 s."""


@dataclass(frozen=True)
class GuestImage:
    """A complete guest image on disk: boot ``kernel`` with ``initrd`` and ``cmdline()``, with
    ``rootfs`` (read-only erofs) as the first virtio-blk disk."""

    key: str
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_version: str

    def cmdline(self, *, bare: bool = False, extra: Sequence[str] = ()) -> str:
        """The kernel command line: common arguments, ``kvmsandbox.root``, ``kvmsandbox.bare=1`` for the
        benchmark floor, then ``extra`` (e.g. ``kvmsandbox.debug=1``, ``kvmsandbox.exec=/bin/busybox,sh``;
        see images/guest/init for every key /init reads).

        Raises:
            GuestImageError: an extra argument is empty or holds whitespace (it would become two).
        """
        for arg in extra:
            if not arg or any(c.isspace() for c in arg):
                raise GuestImageError(f"kernel argument {arg!r} must be non-empty and without whitespace")
        args = [*KERNEL_ARGS, f"kvmsandbox.root={ROOT_DEVICE}"]
        if bare:
            args.append("kvmsandbox.bare=1")
        return " ".join([*args, *extra])


@dataclass(frozen=True)
class BuildReport:
    """The result of build_guest_image. ``built`` is False on a cache hit; ``sizes`` are bytes of
    ``kernel``, ``initrd`` and ``rootfs``; ``seconds`` is the wall time of the call."""

    image: GuestImage
    built: bool
    seconds: float
    sizes: dict[str, int]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def describe(report: BuildReport) -> str:
    """A few human lines about a build (for ``kvmsandbox guest-image build``). Raises nothing."""
    image = report.image
    what = (
        f"built guest image {image.key} in {report.seconds:.1f} s"
        if report.built
        else f"guest image {image.key} is up to date (cache hit, {report.seconds:.2f} s)"
    )
    lines = [
        what,
        f"  kernel  {image.kernel}  ({image.kernel_version}, {_mib(report.sizes.get('kernel', 0))})",
        f"  initrd  {image.initrd}  ({_mib(report.sizes.get('initrd', 0))})",
        f"  rootfs  {image.rootfs}  ({_mib(report.sizes.get('rootfs', 0))}, erofs, read-only)",
    ]
    return "\n".join(lines)

"""The guest kernel: Debian's packaged kernel, its modules' load order, and the initramfs busybox."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.errors import GuestImageError
from kvmsandbox.guest_image import apt
from kvmsandbox.guest_image.modules import load_index, module_closure
from kvmsandbox.guest_image.recipe import Recipe
from kvmsandbox.guest_image.rootfs import Progress, run


@dataclass(frozen=True)
class KernelParts:
    """An unpacked kernel package and the modules to load, in load order."""

    version: str
    """The kernel release (``uname -r``), e.g. ``6.1.0-56-amd64``."""
    package: str
    package_version: str
    vmlinuz: Path
    modules: tuple[tuple[str, Path], ...]
    """(module name, .ko file in the unpacked package) in load order."""


@dataclass(frozen=True)
class Busybox:
    """The static busybox of the initramfs and its applet names."""

    binary: Path
    package_version: str
    applets: tuple[str, ...]


def _modules_root(unpacked: Path) -> Path:
    for candidate in (unpacked / "lib/modules", unpacked / "usr/lib/modules"):
        if candidate.is_dir():
            return candidate
    raise GuestImageError(f"the kernel package unpacked in {unpacked} has no lib/modules")


def fetch(recipe: Recipe, work: Path, progress: Progress) -> tuple[KernelParts, Busybox]:
    """Downloads and unpacks the kernel the recipe's metapackage points to and the static busybox,
    runs depmod on the unpacked modules (the package ships no modules.dep: its postinst makes it) and
    computes the module load order.

    Raises:
        GuestImageError: apt cannot find or fetch a package, depmod is missing, or a module is unknown.
    """
    kernel_package = apt.resolve_kernel_package(recipe.kernel_metapackage)
    progress(f"downloading {kernel_package} and {recipe.initramfs_busybox_package}")
    debs_dir = work / "debs"
    debs_dir.mkdir()
    debs = apt.download([kernel_package, recipe.initramfs_busybox_package], debs_dir)

    unpacked = work / "kernel"
    apt.extract(debs[kernel_package], unpacked)
    versions = sorted(p.name for p in _modules_root(unpacked).iterdir() if p.is_dir())
    if len(versions) != 1:
        raise GuestImageError(f"{kernel_package} ships modules for {versions or 'no'} kernel versions, expected one")
    version = versions[0]
    vmlinuz = unpacked / "boot" / f"vmlinuz-{version}"
    if not vmlinuz.is_file():
        raise GuestImageError(f"{kernel_package} has no boot/vmlinuz-{version}")
    if _modules_root(unpacked) != unpacked / "lib/modules":
        # depmod -b BASE looks in BASE/lib/modules.
        (unpacked / "lib").symlink_to("usr/lib")
    run(["depmod", "-b", str(unpacked), version], "depmod of the guest kernel's modules")
    modules_dir = unpacked / "lib/modules" / version
    index = load_index(modules_dir)
    order = module_closure(recipe.modules, index)

    busybox_dir = work / "busybox"
    apt.extract(debs[recipe.initramfs_busybox_package], busybox_dir)
    binary = busybox_dir / "bin/busybox"
    if not binary.is_file():
        raise GuestImageError(f"{recipe.initramfs_busybox_package} has no /bin/busybox")
    applets = tuple(run([str(binary), "--list"], "listing busybox applets").split())

    kernel = KernelParts(
        version=version,
        package=kernel_package,
        package_version=apt.package_version(debs[kernel_package]),
        vmlinuz=vmlinuz,
        modules=tuple((name, modules_dir / index.paths[name]) for name in order),
    )
    return kernel, Busybox(binary, apt.package_version(debs[recipe.initramfs_busybox_package]), applets)


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed when the package ships ``.ko.xz``/``.ko.gz``/``.ko.zst``
    (busybox insmod loads plain ELF only).

    Raises:
        GuestImageError: the file cannot be read or decompressed.
    """
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(path.read_bytes())
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(path.read_bytes())
        if path.name.endswith(".ko.zst"):
            if shutil.which("zstd") is None:
                raise GuestImageError(f"{path.name} is zstd-compressed and zstd is not installed")
            return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
        return path.read_bytes()
    except (OSError, lzma.LZMAError, subprocess.CalledProcessError) as e:
        raise GuestImageError(f"cannot read kernel module {path}: {e}") from None


# Offsets in the x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).
_SETUP_SECTS = 0x1F1
_HEADER_MAGIC = 0x202
_PAYLOAD_OFFSET = 0x248
_PAYLOAD_LENGTH = 0x24C
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (its compressed payload, decompressed).

    QEMU boots such an ELF through its PVH entry point directly, skipping the bzImage decompressor:
    under TCG that decompressor alone takes ~2.7 s of the ~4.3 s to /init.

    Raises:
        GuestImageError: not a bzImage, or its payload uses a compression this code does not know.
    """
    if len(bzimage) < 0x250 or bzimage[_HEADER_MAGIC : _HEADER_MAGIC + 4] != b"HdrS":
        raise GuestImageError("the kernel is not a bzImage (no HdrS setup header)")
    setup_sects = bzimage[_SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", bzimage, _PAYLOAD_OFFSET)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if payload.startswith(b"\x1f\x8b"):
            return gzip.decompress(payload)
        if payload.startswith(b"\x28\xb5\x2f\xfd"):
            return subprocess.run(["zstd", "-dc"], input=payload, capture_output=True, check=True).stdout
    except (lzma.LZMAError, OSError, subprocess.CalledProcessError) as e:
        raise GuestImageError(f"cannot decompress the bzImage payload: {e}") from None
    raise GuestImageError(f"unknown bzImage payload compression (magic {payload[:6].hex()})")


def elf_notes(elf: bytes) -> list[tuple[bytes, int, bytes]]:
    """(owner, type, descriptor) of every note in a 64-bit little-endian ELF's PT_NOTE segments.

    Raises:
        GuestImageError: not a 64-bit little-endian ELF.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestImageError("the kernel payload is not a 64-bit little-endian ELF")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    notes: list[tuple[bytes, int, bytes]] = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name_start = pos + 12
            desc_start = name_start + (namesz + 3) // 4 * 4
            notes.append(
                (elf[name_start : name_start + namesz].rstrip(b"\0"), ntype, elf[desc_start : desc_start + descsz])
            )
            pos = desc_start + (descsz + 3) // 4 * 4
    return notes


def has_pvh_entry(elf: bytes) -> bool:
    """Whether the ELF kernel has a PVH entry point (the note QEMU's -kernel needs to boot it).

    Raises:
        GuestImageError: not a 64-bit little-endian ELF.
    """
    return any(owner == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY for owner, ntype, _ in elf_notes(elf))


def write_kernel(vmlinuz: Path, dest: Path, kernel_format: str) -> None:
    """Writes the kernel to boot: the bzImage as is, or (``pvh-elf``) its uncompressed ELF.

    Raises:
        GuestImageError: the ELF cannot be extracted or has no PVH entry point (use bzimage then).
        OSError: reading or writing failed.
    """
    if kernel_format == "bzimage":
        shutil.copy2(vmlinuz, dest)
        return
    elf = extract_vmlinux(vmlinuz.read_bytes())
    if not has_pvh_entry(elf):
        raise GuestImageError(f"{vmlinuz.name} has no PVH entry point (CONFIG_PVH): set kernel_format: bzimage")
    dest.write_bytes(elf)

"""Opening a hypervisor backend by name, and its capabilities by name.

Backends are imported only when opened, so naming one does not load the other's libraries
(the libvirt bindings).
"""

from __future__ import annotations

from pathlib import Path

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.host.beneath import traversable_dir
from kvmsandbox.hypervisor.builder import QEMU_BINARY
from kvmsandbox.hypervisor.capabilities import LIBVIRT_CAPABILITIES, QEMU_CAPABILITIES, Capabilities
from kvmsandbox.hypervisor.spec import Hypervisor

DEFAULT_VMM_UID_BASE = 2_000_000_000
"""First uid of the qemu backend's VMMs (one each, up to 2^20 of them): far above the uids of
people, system users and the usual subordinate-id ranges, below 2^31 (tools that take ids as
signed integers)."""


def open_hypervisor(
    backend: str,
    *,
    state_dir: Path,
    libvirt_uri: str | None = None,
    qemu_binary: str = QEMU_BINARY,
    vmm_uid_base: int = DEFAULT_VMM_UID_BASE,
) -> Hypervisor:
    """Open the named backend ("libvirt" or "qemu") with its state under `state_dir`.

    libvirt: `libvirt_uri` defaults to the embedded driver rooted at `state_dir/libvirt`; libvirt
    finds its QEMU itself. qemu: runs `qemu_binary` (a name looked up in PATH, or a path), jailed.
    Both run each QEMU as a uid of its own from `vmm_uid_base` (0: as root, for tests of fakes).
    Raises InvalidArgument for an unknown backend name and HypervisorError when the backend cannot start.
    """
    if backend == "libvirt":
        from kvmsandbox.hypervisor.libvirt_backend import LibvirtHypervisor
        from kvmsandbox.hypervisor.libvirt_embed import embed_uri

        if not libvirt_uri:
            # The default root is in the state dir, which the VMMs' uids pass through (an earlier
            # release made it 0700).
            traversable_dir(state_dir)

        return LibvirtHypervisor(libvirt_uri or embed_uri(state_dir / "libvirt"), uid_base=vmm_uid_base)
    if backend == "qemu":
        from kvmsandbox.hypervisor.qemu_backend import QemuHypervisor

        return QemuHypervisor(state_dir / "qemu", qemu_binary=qemu_binary, uid_base=vmm_uid_base)
    raise _unknown(backend)


def backend_capabilities(backend: str) -> Capabilities:
    """What the named backend can give a VM, without opening or importing it.

    Raises InvalidArgument for an unknown backend name.
    """
    if backend == "libvirt":
        return LIBVIRT_CAPABILITIES
    if backend == "qemu":
        return QEMU_CAPABILITIES
    raise _unknown(backend)


def _unknown(backend: str) -> InvalidArgument:
    return InvalidArgument(f"unknown hypervisor backend {backend!r} (choose 'libvirt' or 'qemu')")

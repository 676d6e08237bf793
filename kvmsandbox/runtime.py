"""Assembles a SandboxManager from a Config: hypervisor backend, guest image, state dirs."""

from __future__ import annotations

from kvmsandbox.config import Config
from kvmsandbox.errors import GuestImageError
from kvmsandbox.guest_image import GuestImage, find_guest_image
from kvmsandbox.hypervisor.factory import open_hypervisor
from kvmsandbox.hypervisor.spec import Hypervisor
from kvmsandbox.sandbox.manager import SandboxManager


def require_guest_image(config: Config) -> GuestImage:
    """The current guest image.

    Raises:
        GuestImageError: not built yet (the message says how to build it).
    """
    image = find_guest_image(config.guest_image_dir)
    if image is None:
        raise GuestImageError(f"no current guest image in {config.guest_image_dir}: run `kvmsandbox guest-image build`")
    return image


def open_hypervisor_for(config: Config, backend: str | None = None) -> Hypervisor:
    """The configured hypervisor backend (or ``backend``), opened."""
    chosen = backend or config.hypervisor.backend
    return open_hypervisor(
        chosen,
        state_dir=config.state_dir,
        libvirt_uri=config.libvirt_uri if chosen == "libvirt" else None,
        qemu_binary=config.hypervisor.qemu_binary,
        vmm_uid_base=config.hypervisor.vmm_uid_base,
    )


def open_manager(config: Config, backend: str | None = None) -> SandboxManager:
    """A SandboxManager ready to create sandboxes.

    Raises:
        GuestImageError: the guest image is missing. HypervisorError: the backend cannot be opened.
    """
    image = require_guest_image(config)
    return SandboxManager(config, open_hypervisor_for(config, backend), image)

"""What each backend says it can give a VM, and the runtime's choice of agent transport and shared
filesystem among it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmsandbox.errors import FailedPrecondition, InvalidArgument
from kvmsandbox.hypervisor.capabilities import (
    LIBVIRT_CAPABILITIES,
    QEMU_CAPABILITIES,
    Capabilities,
    choose_shared_filesystem,
    choose_transport,
)
from kvmsandbox.hypervisor.factory import backend_capabilities, open_hypervisor
from kvmsandbox.hypervisor.libvirt_backend import LibvirtHypervisor
from kvmsandbox.hypervisor.qemu_backend import QemuHypervisor


def caps(
    transports: tuple[str, ...] = ("virtio-serial", "vsock"), filesystems: tuple[str, ...] = ("virtio-9p",)
) -> Capabilities:
    return Capabilities(
        shared_filesystems=frozenset(filesystems),
        agent_transports=frozenset(transports),
        hotplug=frozenset(),
        snapshot_restore=False,
    )


def test_auto_transport_is_vsock_where_the_backend_offers_it_and_the_host_can_use_it() -> None:
    assert choose_transport("auto", caps(), vsock_usable=True) == "vsock"


def test_auto_transport_is_virtio_serial_without_a_usable_vhost_vsock() -> None:
    assert choose_transport("auto", caps(), vsock_usable=False) == "virtio-serial"


def test_auto_transport_is_virtio_serial_when_the_backend_offers_no_vsock() -> None:
    assert choose_transport("auto", caps(transports=("virtio-serial",)), vsock_usable=True) == "virtio-serial"


def test_auto_transport_fails_when_the_backend_offers_only_vsock_and_the_host_cannot_use_it() -> None:
    with pytest.raises(FailedPrecondition, match="offers: vsock"):
        choose_transport("auto", caps(transports=("vsock",)), vsock_usable=False)


@pytest.mark.parametrize("configured", ["vsock", "virtio-serial"])
def test_an_explicit_transport_the_backend_offers_is_kept_whatever_the_host(configured: str) -> None:
    assert choose_transport(configured, caps(), vsock_usable=False) == configured


def test_an_explicit_transport_the_backend_does_not_offer_names_the_ones_it_does() -> None:
    with pytest.raises(FailedPrecondition, match=r"'vsock' is not offered .*offers: virtio-serial\)"):
        choose_transport("vsock", caps(transports=("virtio-serial",)))


def test_auto_transport_looks_at_the_host_only_when_the_backend_offers_vsock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked: list[str] = []

    def usable() -> bool:
        looked.append("/dev/vhost-vsock")
        return True

    monkeypatch.setattr("kvmsandbox.hypervisor.capabilities.vhost_vsock_usable", usable)
    assert choose_transport("auto", caps()) == "vsock"
    assert choose_transport("auto", caps(transports=("virtio-serial",))) == "virtio-serial"
    assert looked == ["/dev/vhost-vsock"]


def test_shared_filesystem_is_the_first_supported_one_the_backend_offers() -> None:
    both = caps(filesystems=("virtio-9p", "virtio-fs"))
    assert choose_shared_filesystem(both) == "virtio-fs"
    assert choose_shared_filesystem(both, supported=("virtio-9p", "virtio-fs")) == "virtio-9p"
    assert choose_shared_filesystem(both, supported=("virtio-fs", "virtio-9p")) == "virtio-fs"
    assert choose_shared_filesystem(caps(filesystems=("virtio-9p",)), supported=("virtio-fs", "virtio-9p")) == (
        "virtio-9p"
    )


def test_shared_filesystem_fails_naming_both_sides_when_nothing_fits() -> None:
    with pytest.raises(FailedPrecondition, match=r"offers: virtio-9p; the runtime uses: virtio-fs"):
        choose_shared_filesystem(caps(filesystems=("virtio-9p",)))


@pytest.mark.parametrize(
    "reported", [LibvirtHypervisor.capabilities, QemuHypervisor.capabilities], ids=["libvirt", "qemu"]
)
def test_each_backend_offers_virtio_fs_both_transports_block_hotplug(reported: Capabilities) -> None:
    assert reported.shared_filesystems == frozenset({"virtio-fs"})
    assert reported.agent_transports == frozenset({"virtio-serial", "vsock"})
    assert reported.hotplug == frozenset({"block"})


def test_only_the_qemu_backend_restores_vm_templates() -> None:
    assert QemuHypervisor.capabilities.snapshot_restore
    assert not LibvirtHypervisor.capabilities.snapshot_restore


def test_backend_capabilities_by_name_are_those_of_the_backend_classes() -> None:
    assert backend_capabilities("libvirt") is LibvirtHypervisor.capabilities is LIBVIRT_CAPABILITIES
    assert backend_capabilities("qemu") is QemuHypervisor.capabilities is QEMU_CAPABILITIES


def test_an_unknown_backend_name_is_an_invalid_argument(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(InvalidArgument, match="'xen'"):
        backend_capabilities("xen")
    with pytest.raises(InvalidArgument, match="'xen'"):
        open_hypervisor("xen", state_dir=tmp_path_factory.mktemp("state"))


def test_the_hypervisor_package_and_doctor_load_no_backend_library_nor_the_layers_above() -> None:
    code = (
        "import sys, kvmsandbox.hypervisor, kvmsandbox.doctor\n"
        "loaded = [m for m in ('libvirt', 'kvmsandbox.cli', 'kvmsandbox.sandbox') if m in sys.modules]\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

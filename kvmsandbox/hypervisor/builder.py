"""Turn a VMSpec into libvirt domain XML or a QEMU command line: pure functions, no I/O.

Both describe the same machine: q35 (microvm hangs calibrating the TSC under TCG with QEMU 7.2),
-nodefaults, no display, no network, the root image as a read-only virtio-blk disk, a virtio-scsi
controller for container disks, ttyS0 appended to a file, the shared dir over virtio-fs (guest RAM
then a shared memfd, which virtiofsd maps), the agent on a virtio-serial port or vsock, no balloon.
A guest reboot or crash ends the VM (the guest kernel panics with panic=-1 and reboots on failure).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from kvmsandbox.hypervisor.disks import SCSI_CONTROLLER_ID
from kvmsandbox.hypervisor.spec import AGENT_PORT_NAME, SHARED_DIR_TAG, TEMPLATE_NIC_MAC, VMSpec

QEMU_BINARY = "qemu-system-x86_64"
MACHINE = "q35"
METADATA_NS = "https://kvmsandbox.dev/xmlns/vm/1"
"""Namespace of the <metadata> element that marks a libvirt domain as ours."""
METADATA_PREFIX = "kvmsandbox"
SECCOMP_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
VIRTIO_FS_QUEUE = 1024


def domain_xml(spec: VMSpec, *, vmm_ids: tuple[int, int] | None = None) -> str:
    """libvirt domain XML for a transient domain running `spec`; with ``vmm_ids`` (uid, gid), QEMU
    runs as those and libvirt changes the owner of no file (a static DAC label, no relabelling).
    Raises nothing."""
    domain = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    ET.SubElement(domain, "name").text = spec.name
    metadata = ET.SubElement(domain, "metadata")
    ET.SubElement(metadata, f"{METADATA_PREFIX}:vm", {f"xmlns:{METADATA_PREFIX}": METADATA_NS})
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    if spec.shared_fs_socket is not None:
        backing = ET.SubElement(domain, "memoryBacking")
        ET.SubElement(backing, "source", type="memfd")
        ET.SubElement(backing, "access", mode="shared")
    ET.SubElement(domain, "vcpu", placement="static").text = str(spec.vcpus)

    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine=MACHINE).text = "hvm"
    ET.SubElement(os_, "kernel").text = str(spec.kernel)
    ET.SubElement(os_, "initrd").text = str(spec.initrd)
    ET.SubElement(os_, "cmdline").text = spec.cmdline

    features = ET.SubElement(domain, "features")
    # Without <acpi/> libvirt passes -no-acpi and the guest can neither power off nor find PCIe (MCFG).
    ET.SubElement(features, "acpi")
    if spec.accel == "tcg":
        tcg = ET.SubElement(features, "tcg")
        ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(spec.tb_cache_mib)
    else:
        ET.SubElement(domain, "cpu", mode="host-passthrough")

    ET.SubElement(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"

    _add_devices(ET.SubElement(domain, "devices"), spec)
    if vmm_ids is not None:
        label = ET.SubElement(domain, "seclabel", type="static", model="dac", relabel="no")
        ET.SubElement(label, "label").text = f"+{vmm_ids[0]}:+{vmm_ids[1]}"
    return ET.tostring(domain, encoding="unicode")


def _add_devices(devices: ET.Element, spec: VMSpec) -> None:
    """The domain's <devices>: root disk, shared dir, console, agent channel, NIC, RNG; no USB, no balloon."""
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw")
    ET.SubElement(disk, "source", file=str(spec.root_disk))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    ET.SubElement(disk, "readonly")

    if spec.shared_fs_socket is not None:
        # virtiofsd is the runtime's (started before the VM): libvirt only connects QEMU to it.
        fs = ET.SubElement(devices, "filesystem", type="mount")
        ET.SubElement(fs, "driver", type="virtiofs", queue=str(VIRTIO_FS_QUEUE))
        ET.SubElement(fs, "source", socket=str(spec.shared_fs_socket))
        ET.SubElement(fs, "target", dir=SHARED_DIR_TAG)

    # Container image and writable layers are hotplugged on it (hypervisor/disks.py).
    ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")

    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(spec.console_log), append="on")
    ET.SubElement(serial, "target", type="isa-serial", port="0")

    if spec.agent is not None and spec.agent.transport == "virtio-serial":
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "source", mode="bind", path=str(spec.agent.socket_path))
        ET.SubElement(channel, "target", type="virtio", name=AGENT_PORT_NAME)
    elif spec.agent is not None:
        vsock = ET.SubElement(devices, "vsock", model="virtio")
        ET.SubElement(vsock, "cid", auto="no", address=str(spec.agent.guest_cid))

    if spec.nic is not None:
        # managed='no': libvirt opens the tap the runtime made instead of creating one.
        iface = ET.SubElement(devices, "interface", type="ethernet")
        ET.SubElement(iface, "mac", address=spec.nic.mac)
        ET.SubElement(iface, "target", dev=spec.nic.tap, managed="no")
        ET.SubElement(iface, "model", type="virtio")
        if spec.nic.mtu:
            ET.SubElement(iface, "mtu", size=str(spec.nic.mtu))

    # The guest's first getrandom() (Python's hash seed) stalls about a second under TCG without it.
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="builtin")

    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")


@dataclass(frozen=True)
class QemuFds:
    """What the qemu backend opened for QEMU (fd numbers QEMU inherits), so that QEMU opens no
    host path but its kernel and initrd (given here as QEMU will see them: inside its jail)."""

    qmp: int
    """A listening unix socket."""
    console: int
    """The console log, opened for appending."""
    root_disk: int
    """The root image, read-only."""
    kernel: str
    initrd: str
    agent: int | None = None
    """A listening unix socket, for a virtio-serial agent channel."""
    vhost_vsock: int | None = None
    """/dev/vhost-vsock, for a vsock agent channel."""
    shared_fs: int | None = None
    """A unix socket connected to the pod's virtiofsd."""
    tap: int | None = None
    """The NIC's tap device, attached (TUNSETIFF) with a virtio-net header."""
    memory: int | None = None
    """A template's or clone's guest RAM (VMSpec.template): a memfd, reached as /proc/self/fd/N."""
    incoming: int | None = None
    """A clone's device state, opened for reading: QEMU waits for it (``-incoming defer``)."""


ROOT_DISK_FDSET = 0
CONSOLE_FDSET = 255
"""fd sets of the root disk and the console log (container disks use 1-254, their SCSI targets)."""


def qemu_argv(spec: VMSpec, fds: QemuFds, *, binary: str = QEMU_BINARY) -> list[str]:
    """QEMU command line for `spec` with everything it uses passed as ``fds``: runs in the
    foreground (the backend detaches it), QMP on ``fds.qmp``, under QEMU's strictest seccomp filter.

    Raises nothing.
    """
    argv = [
        binary,
        "-name", f"guest={spec.name},debug-threads=on",
        *_machine_args(spec, fds),
        *_accel_args(spec),
        "-nodefaults", "-no-user-config", "-display", "none",
        # Mirrors libvirt's on_reboot=destroy: a guest reboot (panic=-1, reboot on failure) ends QEMU.
        "-no-reboot",
        "-smp", str(spec.vcpus),
        "-kernel", fds.kernel,
        "-initrd", fds.initrd,
        "-append", spec.cmdline,
        "-add-fd", f"fd={fds.console},set={CONSOLE_FDSET}",
        "-chardev", f"file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on",
        "-serial", "chardev:console",
        "-add-fd", f"fd={fds.root_disk},set={ROOT_DISK_FDSET}",
        "-blockdev", f"driver=file,node-name=root-file,filename=/dev/fdset/{ROOT_DISK_FDSET},read-only=on",
        "-blockdev", "driver=raw,node-name=root,file=root-file,read-only=on",
        "-device", "virtio-blk-pci,id=root-disk,drive=root",
        # Container image and writable layers are hotplugged on it (hypervisor/disks.py).
        "-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER_ID}",
        # The guest's first getrandom() (Python's hash seed) stalls about a second under TCG without it.
        "-object", "rng-builtin,id=rng",
        "-device", "virtio-rng-pci,id=rng-dev,rng=rng",
    ]  # fmt: skip
    if spec.shared_fs_socket is not None and fds.shared_fs is not None:
        argv += [
            "-chardev", f"socket,id=shared-fs-sock,fd={fds.shared_fs}",
            "-device", f"vhost-user-fs-pci,id=shared-fs,chardev=shared-fs-sock,tag={SHARED_DIR_TAG},"
            f"queue-size={VIRTIO_FS_QUEUE}",
        ]  # fmt: skip
    if spec.agent is not None and spec.agent.transport == "virtio-serial" and fds.agent is not None:
        argv += [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent,fd={fds.agent},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        ]  # fmt: skip
    elif spec.agent is not None and spec.agent.transport == "vsock" and fds.vhost_vsock is not None:
        argv += ["-device", f"vhost-vsock-pci,id=vsock,guest-cid={spec.agent.guest_cid},vhostfd={fds.vhost_vsock}"]
    argv += _template_args(spec, fds) if spec.template is not None else _nic_args(spec, fds)
    argv += [
        "-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        # As libvirt's default: no obsolete syscalls, setuid/setgid, fork, exec or scheduler changes
        # (so no -daemonize, which forks once the filter is in place: the backend detaches QEMU).
        "-sandbox", SECCOMP_SANDBOX,
    ]  # fmt: skip
    return argv


def _nic_args(spec: VMSpec, fds: QemuFds) -> list[str]:
    if spec.nic is None or fds.tap is None:
        return []
    mtu = f",host_mtu={spec.nic.mtu}" if spec.nic.mtu else ""
    return [
        "-netdev", f"tap,id=net0,fd={fds.tap}",
        "-device", f"virtio-net-pci,id=nic0,netdev=net0,mac={spec.nic.mac}{mtu}",
    ]  # fmt: skip


def _template_args(spec: VMSpec, fds: QemuFds) -> list[str]:
    """What a template has and each clone has again: a NIC (unconnected in the template, on the
    pod's tap in a clone; its MAC is the template's until the agent changes it) and vmgenid (a new
    generation id in every clone, on which the guest kernel reseeds); a clone waits for its state."""
    netdev = ""
    argv: list[str] = []
    if spec.template is not None and spec.template.role == "clone" and fds.tap is not None:
        argv += ["-netdev", f"tap,id=net0,fd={fds.tap}"]
        netdev = "netdev=net0,"
    argv += [
        "-device", f"virtio-net-pci,id=nic0,{netdev}mac={TEMPLATE_NIC_MAC}",
        "-device", "vmgenid,id=vmgenid,guid=auto",
    ]  # fmt: skip
    if spec.template is not None and spec.template.role == "clone":
        argv += ["-incoming", "defer"]
    return argv


def _machine_args(spec: VMSpec, fds: QemuFds | None = None) -> list[str]:
    if spec.template is not None and fds is not None and fds.memory is not None:
        share = "on" if spec.template.role == "build" else "off"
        return [
            "-object",
            f"memory-backend-file,id=ram,size={spec.memory_mib}M,mem-path=/proc/self/fd/{fds.memory},share={share}",
            "-machine", f"{MACHINE},memory-backend=ram",
            "-m", str(spec.memory_mib),
        ]  # fmt: skip
    if spec.shared_fs_socket is None:
        return ["-machine", MACHINE, "-m", str(spec.memory_mib)]
    return [
        "-object", f"memory-backend-memfd,id=ram,size={spec.memory_mib}M,share=on",
        "-machine", f"{MACHINE},memory-backend=ram",
        "-m", str(spec.memory_mib),
    ]  # fmt: skip


def _accel_args(spec: VMSpec) -> list[str]:
    if spec.accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", f"tcg,tb-size={spec.tb_cache_mib}"]

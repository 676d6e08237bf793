"""Turn a VMSpec into libvirt domain XML or a QEMU command line: pure functions, no I/O.

Both describe the same machine: q35 (microvm hangs calibrating the TSC under TCG with QEMU 7.2),
-nodefaults, no display, no network, the root image as a read-only virtio-blk disk, a virtio-scsi
controller for container disks, ttyS0 appended to a file, the shared dir over virtio-fs (guest RAM
then a shared memfd, which virtiofsd maps), the agent on a virtio-serial port or vsock, no balloon.
A guest reboot or crash ends the VM (the guest kernel panics with panic=-1 and reboots on failure).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from kvmsandbox.hypervisor.disks import SCSI_CONTROLLER_ID
from kvmsandbox.hypervisor.spec import AGENT_PORT_NAME, QMP_SOCKET_NAME, SHARED_DIR_TAG, VMSpec

QEMU_BINARY = "qemu-system-x86_64"
MACHINE = "q35"
METADATA_NS = "https://kvmsandbox.dev/xmlns/vm/1"
"""Namespace of the <metadata> element that marks a libvirt domain as ours."""
METADATA_PREFIX = "kvmsandbox"
SECCOMP_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
VIRTIO_FS_QUEUE = 1024


def domain_xml(spec: VMSpec) -> str:
    """libvirt domain XML for a transient domain running `spec`. Raises nothing."""
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
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"

    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")


def qemu_argv(spec: VMSpec, *, pidfile: Path, binary: str = QEMU_BINARY) -> list[str]:
    """QEMU command line for `spec`: runs in the foreground (the backend detaches it), writes
    `pidfile`, QMP on run_dir/QMP_SOCKET_NAME, under QEMU's strictest seccomp filter.

    Raises nothing.
    """
    argv = [
        binary,
        "-name", f"guest={spec.name},debug-threads=on",
        *_machine_args(spec),
        *_accel_args(spec),
        "-nodefaults", "-no-user-config", "-display", "none",
        # Mirrors libvirt's on_reboot=destroy: a guest reboot (panic=-1, reboot on failure) ends QEMU.
        "-no-reboot",
        "-smp", str(spec.vcpus),
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.cmdline,
        "-chardev", f"file,id=console,path={_val(spec.console_log)},append=on",
        "-serial", "chardev:console",
        "-blockdev", f"driver=file,node-name=root-file,filename={_val(spec.root_disk)},read-only=on",
        "-blockdev", "driver=raw,node-name=root,file=root-file,read-only=on",
        "-device", "virtio-blk-pci,id=root-disk,drive=root",
        # Container image and writable layers are hotplugged on it (hypervisor/disks.py).
        "-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER_ID}",
        # The guest's first getrandom() (Python's hash seed) stalls about a second under TCG without it.
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-pci,id=rng-dev,rng=rng",
    ]  # fmt: skip
    if spec.shared_fs_socket is not None:
        argv += [
            "-chardev", f"socket,id=shared-fs-sock,path={_val(spec.shared_fs_socket)}",
            "-device", f"vhost-user-fs-pci,id=shared-fs,chardev=shared-fs-sock,tag={SHARED_DIR_TAG},"
            f"queue-size={VIRTIO_FS_QUEUE}",
        ]  # fmt: skip
    if spec.agent is not None and spec.agent.transport == "virtio-serial":
        assert spec.agent.socket_path is not None  # AgentChannel.__post_init__ guarantees it
        argv += [
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=agent,path={_val(spec.agent.socket_path)},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}",
        ]  # fmt: skip
    elif spec.agent is not None:
        argv += ["-device", f"vhost-vsock-pci,id=vsock,guest-cid={spec.agent.guest_cid}"]
    if spec.nic is not None:
        mtu = f",host_mtu={spec.nic.mtu}" if spec.nic.mtu else ""
        argv += [
            "-netdev", f"tap,id=net0,ifname={spec.nic.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,id=nic0,netdev=net0,mac={spec.nic.mac}{mtu}",
        ]  # fmt: skip
    argv += [
        "-chardev", f"socket,id=qmp,path={_val(spec.run_dir / QMP_SOCKET_NAME)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        # As libvirt's default: no obsolete syscalls, setuid/setgid, fork, exec or scheduler changes
        # (so no -daemonize, which forks once the filter is in place: the backend detaches QEMU).
        "-sandbox", SECCOMP_SANDBOX,
        "-pidfile", str(pidfile),
    ]  # fmt: skip
    return argv


def _machine_args(spec: VMSpec) -> list[str]:
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


def _val(path: Path) -> str:
    # QEMU option values are comma-separated; a literal comma is written twice.
    return str(path).replace(",", ",,")

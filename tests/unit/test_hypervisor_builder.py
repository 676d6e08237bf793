"""The domain XML and QEMU command line built from a VMSpec, and VMSpec's own checks."""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from kvmsandbox.errors import HypervisorError, InvalidArgument
from kvmsandbox.hypervisor.builder import METADATA_NS, QemuFds, domain_xml, qemu_argv
from kvmsandbox.hypervisor.libvirt_embed import (
    EMBED_ROOT_MAX,
    closed_ancestor,
    embed_root,
    embed_uri,
    prepare_embed_root,
)
from kvmsandbox.hypervisor.spec import (
    AGENT_PORT_NAME,
    SHARED_DIR_TAG,
    TEMPLATE_NIC_MAC,
    AgentChannel,
    Nic,
    TemplateRole,
    VMSpec,
)


def make_spec(**changes: Any) -> VMSpec:
    spec = VMSpec(
        name="pod-1",
        vcpus=2,
        memory_mib=384,
        accel="tcg",
        kernel=Path("/cache/vmlinuz"),
        initrd=Path("/cache/initrd.img"),
        cmdline="console=ttyS0 panic=-1 kvmsandbox.root=/dev/vda",
        root_disk=Path("/cache/root.erofs"),
        shared_fs_socket=Path("/run/ks/1/fs.sock"),
        agent=AgentChannel("virtio-serial", socket_path=Path("/run/ks/1/agent.sock")),
        console_log=Path("/var/log/ks/1/console.log"),
        run_dir=Path("/run/ks/1"),
        tb_cache_mib=64,
    )
    return dataclasses.replace(spec, **changes)


def parse(spec: VMSpec) -> ET.Element:
    return ET.fromstring(domain_xml(spec))


def attrs(parent: ET.Element, path: str) -> dict[str, str]:
    element = parent.find(path)
    assert element is not None, f"no <{path}>"
    return dict(element.attrib)


def option_values(argv: list[str], flag: str) -> list[str]:
    return [value for f, value in itertools.pairwise(argv) if f == flag]


def test_domain_xml_describes_a_tcg_q35_guest_with_direct_kernel_boot() -> None:
    dom = parse(make_spec())
    assert dom.get("type") == "qemu"
    assert dom.findtext("name") == "pod-1"
    assert attrs(dom, "memory")["unit"] == "MiB"
    assert dom.findtext("memory") == "384"
    assert dom.findtext("vcpu") == "2"
    os_type = dom.find("os/type")
    assert os_type is not None and os_type.get("machine") == "q35" and os_type.text == "hvm"
    assert dom.findtext("os/kernel") == "/cache/vmlinuz"
    assert dom.findtext("os/initrd") == "/cache/initrd.img"
    assert dom.findtext("os/cmdline") == "console=ttyS0 panic=-1 kvmsandbox.root=/dev/vda"
    assert dom.find("features/acpi") is not None
    assert dom.findtext("features/tcg/tb-cache") == "64"
    assert dom.find("cpu") is None
    assert [dom.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_domain_xml_for_kvm_passes_the_host_cpu_and_has_no_tcg_cache() -> None:
    dom = parse(make_spec(accel="kvm"))
    assert dom.get("type") == "kvm"
    assert dom.find("features/tcg") is None
    cpu = dom.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"


def test_domain_xml_root_disk_is_the_first_read_only_virtio_disk() -> None:
    disks = parse(make_spec()).findall("devices/disk")
    assert len(disks) == 1
    disk = disks[0]
    assert attrs(disk, "source")["file"] == "/cache/root.erofs"
    target = disk.find("target")
    assert target is not None and (target.get("dev"), target.get("bus")) == ("vda", "virtio")
    assert disk.find("readonly") is not None
    assert attrs(disk, "driver")["type"] == "raw"


def test_domain_xml_connects_virtio_fs_to_the_runtimes_virtiofsd_and_shares_guest_ram() -> None:
    dom = parse(make_spec())
    fs = dom.find("devices/filesystem")
    assert fs is not None
    assert attrs(fs, "driver") == {"type": "virtiofs", "queue": "1024"}
    # The daemon is the runtime's: libvirt gets its socket, never a host dir to export itself.
    assert attrs(fs, "source") == {"socket": "/run/ks/1/fs.sock"}
    assert attrs(fs, "target")["dir"] == SHARED_DIR_TAG
    assert attrs(dom, "memoryBacking/source") == {"type": "memfd"}
    assert attrs(dom, "memoryBacking/access") == {"mode": "shared"}
    assert parse(make_spec(shared_fs_socket=None)).find("memoryBacking") is None


def test_domain_xml_agent_channel_is_a_virtio_serial_port_on_a_unix_socket_qemu_listens_on() -> None:
    dom = parse(make_spec())
    channel = dom.find("devices/channel")
    assert channel is not None and channel.get("type") == "unix"
    source = channel.find("source")
    assert source is not None and source.get("mode") == "bind" and source.get("path") == "/run/ks/1/agent.sock"
    target = channel.find("target")
    assert target is not None and target.get("type") == "virtio" and target.get("name") == AGENT_PORT_NAME
    assert dom.find("devices/vsock") is None


def test_domain_xml_vsock_agent_gets_a_fixed_guest_cid_and_no_channel() -> None:
    dom = parse(make_spec(agent=AgentChannel("vsock", guest_cid=1234)))
    cid = dom.find("devices/vsock/cid")
    assert cid is not None and cid.get("auto") == "no" and cid.get("address") == "1234"
    assert dom.find("devices/channel") is None


def test_domain_xml_console_is_appended_to_a_file_and_there_are_no_extra_devices() -> None:
    devices = parse(make_spec()).find("devices")
    assert devices is not None
    serial = devices.find("serial")
    assert serial is not None and serial.get("type") == "file"
    source = serial.find("source")
    assert source is not None and source.get("path") == "/var/log/ks/1/console.log" and source.get("append") == "on"
    assert devices.find("interface") is None
    assert devices.find("graphics") is None
    assert attrs(devices, "memballoon")["model"] == "none"
    assert attrs(devices, "rng/backend") == {"model": "builtin"}
    assert attrs(devices, "controller[@type='usb']")["model"] == "none"


def test_domain_xml_gives_qemu_its_own_ids_and_relabels_nothing() -> None:
    label = ET.fromstring(domain_xml(make_spec(), vmm_ids=(2_000_000_007, 2_000_000_007))).find("seclabel")
    assert label is not None
    assert dict(label.attrib) == {"type": "static", "model": "dac", "relabel": "no"}
    assert label.findtext("label") == "+2000000007:+2000000007"
    assert parse(make_spec()).find("seclabel") is None


def test_domain_xml_marks_the_domain_as_ours() -> None:
    assert parse(make_spec()).find(f"metadata/{{{METADATA_NS}}}vm") is not None


def test_bare_boot_spec_has_neither_agent_device_nor_shared_dir() -> None:
    spec = make_spec(agent=None, shared_fs_socket=None)
    devices = parse(spec).find("devices")
    assert devices is not None
    assert devices.find("channel") is None and devices.find("vsock") is None and devices.find("filesystem") is None
    argv = " ".join(argv_of(spec))
    assert "virtserialport" not in argv and "vsock" not in argv and "vhost-user-fs" not in argv
    assert option_values(argv_of(spec), "-machine") == ["q35"]


def test_domain_xml_escapes_markup_in_the_kernel_command_line() -> None:
    assert parse(make_spec(cmdline="a=<b> & c")).findtext("os/cmdline") == "a=<b> & c"


def fds_for(spec: VMSpec, **changes: Any) -> QemuFds:
    """Made-up fd numbers for what the qemu backend would open for ``spec``."""
    fds = QemuFds(
        qmp=10,
        console=11,
        root_disk=12,
        kernel="/vm/kernel",
        initrd="/vm/initrd",
        agent=13 if spec.agent and spec.agent.transport == "virtio-serial" else None,
        vhost_vsock=14 if spec.agent and spec.agent.transport == "vsock" else None,
        shared_fs=15 if spec.shared_fs_socket else None,
        tap=16 if spec.nic else None,
    )
    return dataclasses.replace(fds, **changes)


def argv_of(spec: VMSpec, binary: str = "qemu-system-x86_64") -> list[str]:
    return qemu_argv(spec, fds_for(spec), binary=binary)


def test_qemu_argv_boots_the_same_machine_in_the_foreground_with_qmp_on_a_passed_socket() -> None:
    argv = argv_of(make_spec(), binary="/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert option_values(argv, "-name") == ["guest=pod-1,debug-threads=on"]
    # virtiofsd maps the guest's RAM: a shared memfd, nothing on a host path.
    assert option_values(argv, "-machine") == ["q35,memory-backend=ram"]
    assert option_values(argv, "-object")[0] == "memory-backend-memfd,id=ram,size=384M,share=on"
    assert option_values(argv, "-accel") == ["tcg,tb-size=64"]
    assert {"-nodefaults", "-no-user-config", "-no-reboot"} <= set(argv) and "-daemonize" not in argv
    assert option_values(argv, "-display") == ["none"]
    assert option_values(argv, "-m") == ["384"]
    assert option_values(argv, "-smp") == ["2"]
    # Inside the jail: the only paths QEMU opens.
    assert option_values(argv, "-kernel") == ["/vm/kernel"]
    assert option_values(argv, "-initrd") == ["/vm/initrd"]
    assert option_values(argv, "-append") == ["console=ttyS0 panic=-1 kvmsandbox.root=/dev/vda"]
    assert "-pidfile" not in argv
    assert option_values(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert "socket,id=qmp,fd=10,server=on,wait=off" in option_values(argv, "-chardev")
    assert option_values(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert "-netdev" not in argv and "-nic" not in argv


def test_qemu_argv_for_kvm_uses_the_host_cpu() -> None:
    argv = argv_of(make_spec(accel="kvm"))
    assert option_values(argv, "-accel") == ["kvm"]
    assert option_values(argv, "-cpu") == ["host"]


def test_qemu_argv_devices_match_the_domain_xml_and_every_host_file_is_a_passed_fd() -> None:
    argv = argv_of(make_spec(nic=Nic(tap="tap0", mac="52:54:00:00:00:01", mtu=1400)))
    chardevs = option_values(argv, "-chardev")
    devices = option_values(argv, "-device")
    assert option_values(argv, "-add-fd") == ["fd=11,set=255", "fd=12,set=0"]
    assert "file,id=console,path=/dev/fdset/255,append=on" in chardevs
    assert option_values(argv, "-serial") == ["chardev:console"]
    assert "driver=file,node-name=root-file,filename=/dev/fdset/0,read-only=on" in option_values(argv, "-blockdev")
    # The root disk is the first virtio-blk device, so the guest calls it /dev/vda.
    assert [d for d in devices if d.startswith("virtio-blk")] == ["virtio-blk-pci,id=root-disk,drive=root"]
    assert "-fsdev" not in argv
    assert "socket,id=shared-fs-sock,fd=15" in chardevs
    assert f"vhost-user-fs-pci,id=shared-fs,chardev=shared-fs-sock,tag={SHARED_DIR_TAG},queue-size=1024" in devices
    assert "socket,id=agent,fd=13,server=on,wait=off" in chardevs
    assert f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_PORT_NAME}" in devices
    assert option_values(argv, "-netdev") == ["tap,id=net0,fd=16"]
    assert "virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:00:00:01,host_mtu=1400" in devices
    assert option_values(argv, "-object")[-1] == "rng-builtin,id=rng"
    assert not [d for d in devices if "vsock" in d]
    assert not [a for a in argv if "/run/ks" in a or "/var/" in a or "/cache/" in a]


def test_qemu_argv_vsock_agent_uses_vhost_vsock_with_the_guest_cid_on_a_passed_fd() -> None:
    devices = option_values(argv_of(make_spec(agent=AgentChannel("vsock", guest_cid=77))), "-device")
    assert "vhost-vsock-pci,id=vsock,guest-cid=77,vhostfd=14" in devices
    assert not [d for d in devices if "virtserial" in d]


@pytest.mark.parametrize(
    "changes",
    [
        {"name": ""},
        {"name": "-starts-with-dash"},
        {"name": "has,comma"},
        {"name": "x" * 65},
        {"vcpus": 0},
        {"memory_mib": 16},
        {"accel": "hvf"},
        {"tb_cache_mib": 0},
        {"kernel": Path("relative/vmlinuz")},
        {"run_dir": Path("/" + "r" * 100)},
    ],
)
def test_vmspec_rejects_bad_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        make_spec(**changes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transport": "virtio-serial"},
        {"transport": "virtio-serial", "socket_path": Path("/" + "s" * 120)},
        {"transport": "vsock"},
        {"transport": "vsock", "guest_cid": 2},
        {"transport": "vsock", "guest_cid": 5, "socket_path": Path("/run/a.sock")},
        {"transport": "pigeon", "guest_cid": 5},
    ],
)
def test_agent_channel_rejects_fields_that_do_not_fit_the_transport(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        AgentChannel(**kwargs)


def test_embed_uri_round_trips_a_root_with_odd_characters() -> None:
    root = Path("/var/lib/kvm sandbox/lib&virt")
    assert embed_root(embed_uri(root)) == root
    assert embed_root("qemu:///system") is None


def test_prepare_embed_root_writes_qemu_conf_and_rejects_long_roots() -> None:
    # pytest's tmp_path is too long for an embed root, which is the point of the second half.
    with tempfile.TemporaryDirectory(prefix="ks-", dir="/tmp") as short:
        root = Path(short) / "lv"
        prepare_embed_root(root)
        conf = (root / "etc" / "qemu.conf").read_text()
        assert root.stat().st_mode & 0o777 == 0o711  # VMMs pass through, nobody lists it
    assert 'stdio_handler = "file"' in conf
    # DAC, nothing relabelled (each domain names its own ids), QEMU in a mount namespace of its own.
    assert 'security_driver = "none"' in conf and "dynamic_ownership = 0" in conf
    assert 'namespaces = ["mount"]' in conf
    with pytest.raises(HypervisorError):
        prepare_embed_root(Path("/" + "x" * EMBED_ROOT_MAX))


def test_an_embed_root_behind_a_closed_dir_is_named() -> None:
    with tempfile.TemporaryDirectory(prefix="ks-", dir="/tmp") as short:
        root = Path(short) / "state" / "libvirt"
        prepare_embed_root(root)
        Path(short).chmod(0o700)
        assert closed_ancestor(root) == Path(short)
        Path(short).chmod(0o711)
        (root.parent).chmod(0o711)
        assert closed_ancestor(root) is None


# --- VM templates ---


def template_spec(role: str, **changes: Any) -> VMSpec:
    state = 8 if role == "clone" else None
    return make_spec(shared_fs_socket=None, template=TemplateRole(role, 7, state), **changes)  # type: ignore[arg-type]


def test_template_ram_is_the_memfd_shared_and_a_clone_maps_it_private() -> None:
    built = qemu_argv(template_spec("build"), fds_for(template_spec("build"), memory=20))
    clone = qemu_argv(template_spec("clone"), fds_for(template_spec("clone"), memory=20, incoming=21))
    assert "memory-backend-file,id=ram,size=384M,mem-path=/proc/self/fd/20,share=on" in option_values(built, "-object")
    assert "memory-backend-file,id=ram,size=384M,mem-path=/proc/self/fd/20,share=off" in option_values(clone, "-object")
    assert option_values(built, "-incoming") == []
    assert option_values(clone, "-incoming") == ["defer"]


def test_template_and_clone_have_the_same_devices_and_no_shared_filesystem() -> None:
    nic = Nic(tap="kvsb-tap1", mac="52:54:00:00:00:09")
    built = qemu_argv(template_spec("build"), fds_for(template_spec("build"), memory=20))
    clone_spec = template_spec("clone", nic=nic)
    clone = qemu_argv(clone_spec, fds_for(clone_spec, memory=20, incoming=21))

    def ids(argv: list[str]) -> list[str]:
        return sorted(v.split("id=")[1].split(",")[0] for v in option_values(argv, "-device") if "id=" in v)

    assert ids(built) == ids(clone)
    assert not any("vhost-user-fs" in v for v in option_values(clone, "-device"))
    # The clone's NIC starts with the template's MAC (the guest takes the pod's) on the pod's tap.
    assert f"virtio-net-pci,id=nic0,netdev=net0,mac={TEMPLATE_NIC_MAC}" in option_values(clone, "-device")
    assert "tap,id=net0,fd=16" in option_values(clone, "-netdev")
    assert option_values(built, "-netdev") == []


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"shared_fs_socket": Path("/run/ks/1/fs.sock")}, "shared filesystem"),
        ({"agent": AgentChannel("vsock", guest_cid=9)}, "virtio-serial"),
    ],
)
def test_a_template_refuses_what_a_clone_could_not_keep(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make_spec(**{"shared_fs_socket": None, **changes}, template=TemplateRole("build", 7))


def test_a_clone_needs_its_templates_state() -> None:
    with pytest.raises(InvalidArgument, match="state_fd"):
        make_spec(shared_fs_socket=None, template=TemplateRole("clone", 7))

"""``kvmsandbox doctor``: what this host offers the runtime and what is missing."""

from __future__ import annotations

import pwd
import shutil

from kvmsandbox.config import Config
from kvmsandbox.errors import FailedPrecondition
from kvmsandbox.guest_image import find_guest_image
from kvmsandbox.host.confinement import running_vmms
from kvmsandbox.host.tools import tool_version
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.hypervisor.accel import detect_accel
from kvmsandbox.hypervisor.builder import SECCOMP_SANDBOX
from kvmsandbox.hypervisor.capabilities import Capabilities, choose_transport
from kvmsandbox.hypervisor.factory import backend_capabilities


def run_doctor(config: Config) -> int:
    """Prints one line per check; returns 1 with a sentence per problem when something required is missing."""
    problems: list[str] = []
    for check in (
        _check_accel,
        _check_transport,
        _check_shared_fs,
        _check_templates,
        _check_qemu,
        _check_hypervisor,
        _check_guest_image,
        _check_pod_network,
        _check_host_tools,
        _check_confinement,
    ):
        problems += check(config)
    for p in problems:
        print(f"PROBLEM: {p}")
    print("ok: this host can run kvmsandbox" if not problems else f"{len(problems)} problem(s) to fix")
    return 1 if problems else 0


# Each check prints its lines and returns the problems it found, in words a person can act on.


def _check_accel(config: Config) -> list[str]:
    accel, reason = detect_accel() if config.hypervisor.accel == "auto" else (config.hypervisor.accel, "set in config")
    print(f"accel:            {accel} ({reason})")
    if accel == "tcg":
        print("                  guests run under software emulation: expect boots about ten times slower than KVM")
    return []


def _check_transport(config: Config) -> list[str]:
    caps = backend_capabilities(config.hypervisor.backend)
    try:
        transport = choose_transport(config.agent.transport, caps)
    except FailedPrecondition as e:
        print(f"agent transport:  none ({e})")
        return [f"no agent transport: {e}"]
    why = _transport_reason(config, caps, transport)
    print(f"agent transport:  {transport} ({why})")
    return []


def _check_shared_fs(config: Config) -> list[str]:
    binary = virtiofsd.find()
    if binary is None:
        print("shared fs:        virtio-fs, but no virtiofsd")
        return [f"virtiofsd is missing (looked in PATH and at {', '.join(virtiofsd.PATHS)}): install qemu-system-x86"]
    print(f"shared fs:        virtio-fs ({binary}: root, its own mount, pid and network namespaces, seccomp)")
    return []


def _check_templates(config: Config) -> list[str]:
    handlers = config.templates.handlers
    if not handlers:
        print("vm templates:     off (templates.handlers is empty)")
        return []
    if not backend_capabilities(config.hypervisor.backend).snapshot_restore:
        print(f"vm templates:     asked for {', '.join(handlers)}, but the {config.hypervisor.backend} backend "
              "cannot restore them: those pods boot cold")  # fmt: skip
        return [
            f"templates.handlers needs hypervisor.backend: qemu (the {config.hypervisor.backend} backend "
            "has no device-state restore here); until then those handlers' pods boot cold"
        ]
    print(f"vm templates:     {', '.join(handlers)}: clones of templates of {config.templates.vcpus} vCPUs x "
          f"{config.templates.memory_classes_mib} MiB (pages shared between tenants' VMs; no host paths)")  # fmt: skip
    return []


def _check_qemu(config: Config) -> list[str]:
    qemu = tool_version([config.hypervisor.qemu_binary, "--version"])
    print(f"qemu:             {qemu}")
    if qemu == "not installed":
        return [f"{config.hypervisor.qemu_binary} is missing: install the qemu-system-x86 package"]
    return []


def _check_hypervisor(config: Config) -> list[str]:
    problems: list[str] = []
    print(
        f"hypervisor:       {config.hypervisor.backend}"
        + (f" ({config.libvirt_uri})" if config.hypervisor.backend == "libvirt" else "")
    )
    try:
        import libvirt

        major, rest = divmod(libvirt.getVersion(), 1_000_000)
        print(f"libvirt:          {major}.{rest // 1000}.{rest % 1000}")
    except ImportError:
        print("libvirt:          python bindings missing")
        if config.hypervisor.backend == "libvirt":
            problems.append("libvirt-python is not installed: run `make setup` (or choose hypervisor.backend: qemu)")
    if config.hypervisor.backend == "libvirt" and config.libvirt_uri.startswith("qemu:///embed"):
        try:
            pwd.getpwnam("libvirt-qemu")
        except KeyError:
            problems.append(
                "the embedded libvirt driver needs a libvirt-qemu user: run `make setup` or "
                "`useradd --system --user-group --no-create-home libvirt-qemu`"
            )
    return problems


def _check_guest_image(config: Config) -> list[str]:
    image = find_guest_image(config.guest_image_dir)
    if image is None:
        print(f"guest image:      not built in {config.guest_image_dir}")
        return ["the guest image is not built: run `kvmsandbox guest-image build`"]
    print(f"guest image:      {image.key[:16]} kernel {image.kernel_version} in {image.rootfs.parent}")
    return []


def _check_pod_network(config: Config) -> list[str]:
    from kvmsandbox.network.pod import PodNetworking

    net = PodNetworking(config).status()
    print(f"pod network:      {net.message}")
    if not net.ready:
        return [
            "pods cannot get a network (NetworkReady false): put a CNI config in "
            f"{config.network.cni_conf_dirs[0]} (`make setup` installs a single-node bridge)"
        ]
    return []


def _check_host_tools(config: Config) -> list[str]:
    problems = [
        f"{tool}(8) is missing: install the iproute2 package" for tool in ("ip", "tc") if not shutil.which(tool)
    ]
    if not shutil.which("mount"):
        problems.append("mount(8) is missing")
    return problems


# What each backend asks of QEMU (the running VMMs below show what it got).
_CONFINEMENT = {
    "qemu": f"jailed: a uid of its own, no capabilities, its own mount namespace (only /usr, its kernel "
    f"and a few devices) and network namespace, every file passed as an fd, seccomp filter ({SECCOMP_SANDBOX})",
    "libvirt": "a uid of its own (a static DAC label per domain, nothing relabelled), no capabilities, "
    "libvirt's mount namespace with a private /dev, disks passed as fds, seccomp_sandbox (the same denials)",
}


def _check_confinement(config: Config) -> list[str]:
    problems = []
    print(f"container rootfs: {config.sandbox.container_rootfs}")
    if config.sandbox.container_rootfs == "block":
        problems += [f"{tool} is missing: install {pkg}" for tool, pkg in _ROOTFS_TOOLS if not shutil.which(tool)]
    else:
        print("                  host overlays over virtio-fs: a guest writes host directories through them")
    print(f"qemu confinement: {_CONFINEMENT.get(config.hypervisor.backend, 'unknown backend')}")
    for vmm in running_vmms():
        print(
            f"  running {vmm.vm_name} pid {vmm.pid}: uid {vmm.uid}, seccomp mode {vmm.seccomp}, "
            f"{'own' if vmm.own_mount_namespace else 'host'} mount namespace, capabilities {vmm.capabilities:#x}"
        )
    return problems


_ROOTFS_TOOLS = (("mkfs.erofs", "erofs-utils"), ("mkfs.ext4", "e2fsprogs"))


def _transport_reason(config: Config, caps: Capabilities, transport: str) -> str:
    if config.agent.transport != "auto":
        return "set in config"
    if transport == "vsock":
        return "/dev/vhost-vsock is usable"
    if "vsock" not in caps.agent_transports:
        return f"the {config.hypervisor.backend} backend offers no vsock"
    return "no usable /dev/vhost-vsock"

"""The runtime's configuration: one YAML file, every key with a default, checked at start.

Unknown keys and wrong types are errors with a sentence that names the key, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from kvmsandbox.errors import InvalidArgument

DEFAULT_CONFIG_PATH = Path("/etc/kvmsandbox/config.yaml")


class ConfigError(InvalidArgument):
    """The configuration file is unreadable or has a wrong key or value."""


# Above system users and the first user's subordinate ids; the whole range below 2^31 (some tools
# take ids as signed 32-bit integers).
VMM_UID_MIN = 1 << 17
VMM_UID_MAX = (1 << 31) - (1 << 20)


@dataclass(frozen=True)
class HypervisorConfig:
    # "libvirt" (embedded driver by default) or "qemu" (a QEMU process driven over QMP).
    backend: Literal["libvirt", "qemu"] = "libvirt"
    # Empty: qemu:///embed?root=<state_dir>/libvirt. qemu:///system uses a running libvirtd.
    libvirt_uri: str = ""
    # "auto" uses KVM only where it really works (see `kvmsandbox doctor`), else TCG.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    # Cap on TCG's translation cache; QEMU's default of 1 GiB inflates the VMM's memory.
    tb_cache_mib: int = 64
    # The QEMU the qemu backend runs (a name looked up in PATH, or a path); libvirt finds its own.
    qemu_binary: str = "qemu-system-x86_64"
    # qemu backend: each QEMU runs jailed (its own mount and network namespaces, no capabilities)
    # as a uid and gid of its own from [vmm_uid_base, vmm_uid_base + 2^20), a range no user or
    # user-namespaced pod of the node may use.
    vmm_uid_base: int = 2_000_000_000

    def __post_init__(self) -> None:
        if not VMM_UID_MIN <= self.vmm_uid_base <= VMM_UID_MAX:
            raise ConfigError(
                f"config key 'hypervisor.vmm_uid_base' must be between {VMM_UID_MIN} and {VMM_UID_MAX} "
                f"(the range of 2^20 uids after it must be free), got {self.vmm_uid_base}"
            )


@dataclass(frozen=True)
class AgentConfig:
    # "auto": vsock where /dev/vhost-vsock exists, virtio-serial otherwise.
    transport: Literal["auto", "vsock", "virtio-serial"] = "auto"
    ready_timeout_seconds: float = 90.0
    call_timeout_seconds: float = 30.0
    # Per guest, in calls made for the whole node (ListContainers, the List*Stats): a guest that
    # does not answer in time is shown with its last known state.
    node_call_timeout_seconds: float = 2.0


@dataclass(frozen=True)
class SandboxDefaults:
    # Used when the pod declares no limits (LinuxPodSandboxConfig.resources); otherwise the VM gets
    # the pod's limits plus the guest's own overhead (see kvmsandbox.overhead.sizing).
    vcpus: int = 1
    memory_mib: int = 256
    # Floor for sized VMs: below this the guest kernel and agent do not boot reliably.
    min_memory_mib: int = 128
    # Ceiling for sized VMs' vCPUs; unset means the host's CPU count.
    max_vcpus: int | None = None
    # Each VM's serial console log (the guest writes it at will) stays below this: the server
    # checks every log twice a second and cuts one past 3/4 of it back to its most recent half.
    console_log_max_bytes: int = 1 << 20
    # Each stream of each container (and exec) is copied from the guest at most this fast; a
    # container writing faster waits on its pipe. Bounds the host CPU a chatty or hostile
    # container can make the runtime spend on its logs.
    output_bytes_per_second: int = 16 << 20
    # "block": each image layer is an erofs disk and each container's writable layer an ext4 disk
    # (a sparse file on the host), both hotplugged into the guest; the host never mounts what a
    # guest writes. "share": host overlays exported over virtio-9p (the previous design, kept to
    # compare with; a guest writes into host directories through it).
    container_rootfs: Literal["block", "share"] = "block"
    # Size of each container's writable layer disk (sparse: the host holds what the guest wrote).
    writable_layer_mib: int = 10240


@dataclass(frozen=True)
class StreamingConfig:
    # Where the streaming server (the URLs Exec returns) listens: plain HTTP, as containerd's
    # default; the kubelet on this node connects to it. Port 0: a free port chosen at start.
    address: str = "127.0.0.1"
    port: int = 0
    # A session that receives nothing for this long ends (containerd's stream_idle_timeout).
    idle_timeout_seconds: float = 4 * 3600.0
    # TLS: both PEM files, or neither (plain HTTP, as containerd's default).
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("config keys 'streaming.tls_cert_file' and 'streaming.tls_key_file' go together")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ConfigError(f"config key 'streaming.address' must be an IP address, got {self.address!r}") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"config key 'streaming.port' must be 1-65535, got {self.port}")


@dataclass(frozen=True)
class ConsoleConfig:
    # The debug console: an SSH server (public keys only) that opens a shell in a pod's guest,
    # outside its containers. It always listens on ``<run_dir>/console.sock`` (root only), which
    # `kvmsandbox console POD` uses; ``listen`` adds an address for any SSH client: "" (off),
    # "127.0.0.1:PORT" (loopback only) or "unix:/path". The SSH user names the pod (its id or a
    # unique prefix). Every session is logged to ``<state_dir>/console-audit.log``.
    authorized_keys: Path = Path("/etc/kvmsandbox/console_authorized_keys")
    listen: str = ""

    def __post_init__(self) -> None:
        if not self.listen or self.listen.startswith("unix:/"):
            return
        host, _, port = self.listen.rpartition(":")
        try:
            loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
        except ValueError:
            loopback = False
        if not (loopback and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"config key 'console.listen' must be \"\", a loopback IP:PORT or unix:/path, got {self.listen!r}"
            )


@dataclass(frozen=True)
class OverheadConfig:
    # Added to the highest observed overhead to make the recommended RuntimeClass podFixed.
    margin_percent: float = 10.0
    # Where the VMM's host process is accounted: "pod" puts it in the pod's cgroup (below
    # LinuxPodSandboxConfig.cgroup_parent), so the pod's limits include the VM; "overhead" puts it
    # in a cgroup of its own below `overhead_cgroup`, apart from the pods (Kata's
    # sandbox_cgroup_only=false).
    vmm_cgroup: Literal["pod", "overhead"] = "pod"
    overhead_cgroup: str = "/kvmsandbox_overhead"
    # Pods whose kubelet gives no cgroup_parent (crictl) are accounted below this cgroup.
    default_cgroup_parent: str = "/kvmsandbox"
    # What the guest needs beside its containers (kernel reservation plus idle use) when VMs are
    # sized before `kvmsandbox overhead measure` ran on this node; afterwards the measurement counts.
    guest_memory_mib: int = 96
    # RuntimeClass scheduling.nodeSelector: the label of nodes that run kvmsandbox.
    node_selector: dict[str, str] = field(default_factory=lambda: {"kvmsandbox.io/runtime": "true"})


@dataclass(frozen=True)
class NetworkConfig:
    # CNI network configs: the lexically first *.conflist, *.conf or *.json of the first dir that
    # has one is the pod network (as containerd and CRI-O choose).
    cni_conf_dirs: list[Path] = field(default_factory=lambda: [Path("/etc/cni/net.d")])
    # Where plugin binaries are looked up, in order (Debian's containernetworking-plugins installs
    # them in /usr/lib/cni).
    cni_bin_dirs: list[Path] = field(default_factory=lambda: [Path("/opt/cni/bin"), Path("/usr/lib/cni")])


@dataclass(frozen=True)
class ImageLimits:
    """What the runtime accepts from an image, per layer; a pull past a limit fails with
    RESOURCE_EXHAUSTED naming it, and stores nothing."""

    max_layer_bytes: int = 8 << 30  # compressed, as the manifest declares it
    max_unpacked_layer_bytes: int = 32 << 30  # the tar stream once decompressed
    max_layer_entries: int = 1_000_000  # files, directories, links
    max_tar_header_bytes: int = 1 << 20  # one pax or GNU long-name header


@dataclass(frozen=True)
class RegistryConfig:
    # Registry host -> endpoints tried in order before the registry itself, e.g.
    # {"registry.k8s.io": ["http://127.0.0.1:5000"]} (as containerd's hosts.toml or CRI-O's
    # registries.conf allow), so air-gapped nodes pull public names from a local mirror.
    mirrors: dict[str, list[str]] = field(default_factory=dict)
    # Hosts (host:port) that may be reached over plain HTTP; loopback addresses always may.
    insecure: list[str] = field(default_factory=list)
    limits: ImageLimits = field(default_factory=ImageLimits)


@dataclass(frozen=True)
class TemplateConfig:
    # Runtime handlers whose pods start as clones of a VM template (qemu backend): they start in a
    # fraction of a cold boot and share the memory they did not write with every other clone. Off
    # by default: pages shared between tenants' VMs are a timing side channel (as KSM's), and the
    # pods of such a handler have no shared filesystem, so no host paths (README "VM templates").
    handlers: list[str] = field(default_factory=list)
    # A template has a fixed size: a pod's VM memory is rounded up to the smallest class that holds
    # it; a larger pod boots cold.
    memory_classes_mib: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048])
    # vCPU counts templates are kept for (one template per count and class); other pods boot cold.
    vcpus: list[int] = field(default_factory=lambda: [1, 2])
    # Clones of the default-size template (sandbox.vcpus, sandbox.memory_mib) restored ahead and
    # waiting for pods of a template handler; 0: none. Refilled in the background, drained when the
    # server stops, given back while the host's available memory is below the floor.
    warm_pool: int = 0
    warm_pool_min_available_mib: int = 1024

    def __post_init__(self) -> None:
        if self.warm_pool > 64:
            raise ConfigError("config key 'templates.warm_pool' must be at most 64")
        if (
            not self.vcpus
            or len(self.vcpus) * len(self.memory_classes_mib) > 32
            or any(not 1 <= v <= 64 for v in self.vcpus)
        ):
            raise ConfigError(
                "config key 'templates.vcpus' must list 1-64 vCPUs, at most 32 templates with the memory classes"
            )
        if not self.memory_classes_mib or any(c < 128 or c > 65536 for c in self.memory_classes_mib):
            raise ConfigError("config key 'templates.memory_classes_mib' must list sizes of 128-65536 MiB")


@dataclass(frozen=True)
class Config:
    state_dir: Path = Path("/var/lib/kvmsandbox")
    # Sockets live here; keep the path short (unix socket paths are limited to 108 bytes).
    run_dir: Path = Path("/run/kvmsandbox")
    # Guest image and other rebuildable things.
    cache_dir: Path = Path("/var/cache/kvmsandbox")
    # The CRI socket kubelet and crictl connect to.
    socket: Path = Path("/run/kvmsandbox/kvmsandbox.sock")
    # RuntimeClass handlers served (RunPodSandboxRequest.runtime_handler); "" means the first.
    runtime_handlers: list[str] = field(default_factory=lambda: ["kvmsandbox"])
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    sandbox: SandboxDefaults = field(default_factory=SandboxDefaults)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    overhead: OverheadConfig = field(default_factory=OverheadConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    templates: TemplateConfig = field(default_factory=TemplateConfig)

    def __post_init__(self) -> None:
        unknown = [h for h in self.templates.handlers if h not in self.runtime_handlers]
        if unknown:
            raise ConfigError(
                f"config key 'templates.handlers' names {unknown[0]!r}, which is not in 'runtime_handlers'"
            )
        if self.templates.handlers and self.sandbox.container_rootfs != "block":
            raise ConfigError("config key 'templates.handlers' needs 'sandbox.container_rootfs: block'")

    @property
    def image_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def cni_cache_dir(self) -> Path:
        """CNI results of running pods, needed for their DEL."""
        return self.state_dir / "cni"

    @property
    def measurement_file(self) -> Path:
        """The node's overhead measurement, written by `kvmsandbox overhead measure`."""
        return self.state_dir / "overhead.json"

    def measurement_file_for(self, handler: str) -> Path:
        """The measurement a handler's RuntimeClass is made from: a template handler's pods cost
        another amount (their guest pages are shared) and have a file of their own."""
        if handler in self.templates.handlers:
            return self.state_dir / f"overhead-{handler}.json"
        return self.measurement_file

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def guest_image_dir(self) -> Path:
        return self.cache_dir / "guest-image"

    @property
    def libvirt_uri(self) -> str:
        return self.hypervisor.libvirt_uri or f"qemu:///embed?root={self.state_dir / 'libvirt'}"


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is Literal:
        if value not in get_args(hint):
            allowed = ", ".join(repr(a) for a in get_args(hint))
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = get_args(hint)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        key_type, value_type = get_args(hint)
        return {_convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} has an invalid value {value!r}")
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config key {key!r} must be a path, got {value!r}")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, hint)):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if hint in (int, float) and value <= 0:
        raise ConfigError(f"config key {key!r} must be positive, got {value!r}")
    if hint in (str, bool) and not isinstance(value, hint):
        raise ConfigError(f"config key {key!r} must be a {hint.__name__}, got {value!r}")
    return value


def _build(cls: type[Any], data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (known here: {', '.join(sorted(names))})")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in data.items()})


def parse_config(text: str, source: str = "<config>") -> Config:
    """A Config from YAML text; empty text gives the defaults.

    Raises:
        ConfigError: not YAML, not a mapping, an unknown key or a wrong value.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of config keys")
    try:
        config: Config = _build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def load_config(path: Path | None) -> Config:
    """Reads the config file; a missing default file gives the defaults, a missing named file is an error.

    Raises:
        ConfigError: as parse_config, or the named file cannot be read.
    """
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    return parse_config(text, str(path))

"""Checks of CRI input at the edge, before any side effect: every string a request carries ends up
in a file name, a JSON record, a CNI argument, the guest or a log, so each is bounded and free of
NUL and control characters; paths are absolute or relative as the API says and cannot climb out;
numbers are clamped to what the runtime can do. A violation is INVALID_ARGUMENT naming the field
and quoting at most a short prefix of the value."""

from __future__ import annotations

import ipaddress
import posixpath
import re
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.errors import InvalidArgument

MAX_NAME = 253  # a Kubernetes object name (DNS subdomain)
MAX_TEXT = 4096  # a path, a command-line word, a DNS option
MAX_KEY = 1024
MAX_VALUE = 256 * 1024  # Kubernetes' own bound on all of an object's annotations together
MAX_MAP_BYTES = 1024 * 1024  # labels or annotations of one object, keys and values together
MAX_WORDS_BYTES = 1024 * 1024  # a command, its arguments, or the environment, all together
MAX_LIST = 1024  # entries of a repeated field (mounts, DNS servers, ports, command words)
MAX_HOSTNAME = 64  # the kernel's limit; the kubelet sends up to 64 (an FQDN with setHostnameAsFQDN)
# Timeouts beyond this are clamped: a week is longer than any caller waits.
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


def quote(value: str, limit: int = 40) -> str:
    """A value as an error message shows it: repr'd, cut to ``limit`` characters."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def text(field: str, value: str, *, limit: int = MAX_TEXT, required: bool = False, control: bool = False) -> str:
    """Raises InvalidArgument: empty when required, longer than ``limit``, a NUL (or, unless
    ``control``, any control character)."""
    if required and not value:
        raise InvalidArgument(f"{field} must not be empty")
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters long, more than {limit}: {quote(value)}")
    bad = "\x00" in value if control else _CONTROL.search(value) is not None
    if bad:
        raise InvalidArgument(f"{field} contains a NUL or control character: {quote(value)}")
    return value


def words(field: str, values: Iterable[str]) -> list[str]:
    """A list of strings (a command, DNS servers): bounded in number and size, no NUL."""
    out = list(values)
    if len(out) > MAX_LIST:
        raise InvalidArgument(f"{field} has {len(out)} entries, more than {MAX_LIST}")
    for i, v in enumerate(out):
        text(f"{field}[{i}]", v, control=True)
    if sum(len(v) for v in out) > MAX_WORDS_BYTES:
        raise InvalidArgument(f"{field} holds more than {MAX_WORDS_BYTES} characters in all")
    return out


def string_map(field: str, values: Mapping[str, str]) -> dict[str, str]:
    """Labels or annotations: keys without control characters, bounded keys, values and total."""
    total = 0
    for k, v in values.items():
        text(f"{field} key", k, limit=MAX_KEY, required=True)
        text(f"{field}[{quote(k, 20)}]", v, limit=MAX_VALUE, control=True)
        total += len(k) + len(v)
    if total > MAX_MAP_BYTES:
        raise InvalidArgument(f"{field} hold {total} characters, more than {MAX_MAP_BYTES}")
    return dict(values)


def absolute_path(field: str, value: str, *, required: bool = True) -> str:
    """An absolute path without '..' steps (normalized)."""
    text(field, value, required=required)
    if not value:
        return value
    if not value.startswith("/"):
        raise InvalidArgument(f"{field} must be an absolute path: {quote(value)}")
    if ".." in value.split("/"):
        raise InvalidArgument(f"{field} must not contain '..': {quote(value)}")
    return posixpath.normpath(value)


def log_path(log_directory: str, value: str) -> Path | None:
    """The container's log file: ``value`` relative to the pod's log directory and below it; None
    when either is empty (the runtime keeps the log in the sandbox's own dir)."""
    text("log_path", value)
    if not log_directory or not value:
        return None
    if value.startswith("/"):
        raise InvalidArgument(f"log_path must be relative to the pod's log_directory: {quote(value)}")
    parts = value.split("/")
    if ".." in parts or value.endswith("/") or posixpath.normpath(value) in (".", ""):
        raise InvalidArgument(f"log_path must name a file below the pod's log_directory: {quote(value)}")
    return Path(log_directory, posixpath.normpath(value))


def hostname(value: str, pod_name: str) -> str:
    """The pod's hostname; when none is given, the pod's name cut to 63 characters, as the kubelet
    does (a longer name cannot be a hostname)."""
    if not value:
        derived = pod_name.lower()[:63].rstrip("-.")
        return derived if _HOSTNAME.match(derived) else "localhost"
    if len(value) > MAX_HOSTNAME or not _HOSTNAME.match(value):
        raise InvalidArgument(
            f"hostname must be at most {MAX_HOSTNAME} characters of a-z, 0-9, '-' and '.': {quote(value)}"
        )
    return value


def timeout(seconds: int) -> float:
    """A timeout in seconds, negative as 0, clamped to MAX_TIMEOUT_SECONDS."""
    return float(min(max(0, seconds), MAX_TIMEOUT_SECONDS))


def stop_signal(name: str) -> int:
    """An image's StopSignal ("SIGQUIT", "QUIT" or "3") as a number; SIGTERM when unset.

    Raises:
        InvalidArgument: not a signal this system knows.
    """
    text("the image's StopSignal", name, limit=32)
    if not name:
        return int(signal.SIGTERM)
    upper = name.upper().removeprefix("SIG")
    number: int | None = None
    if name.isdigit():
        number = int(name)
    elif upper.startswith(("RTMIN+", "RTMAX-")) and upper[6:].isdigit():
        base, offset = (signal.SIGRTMIN, int(upper[6:])) if upper[3] == "I" else (signal.SIGRTMAX, -int(upper[6:]))
        number = int(base) + offset
    elif f"SIG{upper}" in signal.Signals.__members__:
        number = int(signal.Signals[f"SIG{upper}"])
    if number is None or not 1 <= number <= signal.SIGRTMAX:
        raise InvalidArgument(f"unknown stop signal {quote(name)} in the image config")
    return number


def pod_config(config: cri.PodSandboxConfig) -> None:
    """Everything of a RunPodSandbox config that reaches a file, a record, CNI or the guest.

    Raises:
        InvalidArgument: naming the first field that is wrong.
    """
    md = config.metadata
    text("metadata.name", md.name, limit=MAX_NAME, required=True)
    text("metadata.namespace", md.namespace, limit=MAX_NAME, required=True)
    text("metadata.uid", md.uid, limit=MAX_NAME, required=True)
    string_map("labels", config.labels)
    string_map("annotations", config.annotations)
    absolute_path("log_directory", config.log_directory, required=False)
    text("hostname", config.hostname, limit=MAX_NAME)
    dns = config.dns_config
    for field, values in (("servers", dns.servers), ("searches", dns.searches), ("options", dns.options)):
        for i, v in enumerate(words(f"dns_config.{field}", values)):
            text(f"dns_config.{field}[{i}]", v, limit=MAX_NAME)
    if len(config.port_mappings) > MAX_LIST:
        raise InvalidArgument(f"port_mappings has {len(config.port_mappings)} entries, more than {MAX_LIST}")
    for i, p in enumerate(config.port_mappings):
        for field, port in (("container_port", p.container_port), ("host_port", p.host_port)):
            if not 0 <= port <= 65535:
                raise InvalidArgument(f"port_mappings[{i}].{field} {port} is not a port number (0-65535)")
        if p.host_ip:
            try:
                ipaddress.ip_address(p.host_ip)
            except ValueError:
                raise InvalidArgument(f"port_mappings[{i}].host_ip is not an IP address: {quote(p.host_ip)}") from None
    cgroup_parent(config.linux.cgroup_parent)
    sysctls(config.linux.sysctls)


def cgroup_parent(value: str) -> str:
    """A cgroup path ("/kubepods/burstable/pod...") or a systemd slice name, without '..' steps."""
    text("linux.cgroup_parent", value)
    if ".." in value.split("/"):
        raise InvalidArgument(f"linux.cgroup_parent must not contain '..': {quote(value)}")
    return value


def container_config(config: cri.ContainerConfig) -> None:
    """Everything of a CreateContainer config that reaches a file, a record or the guest (the log
    path is checked against the pod's log directory by ``log_path``).

    Raises:
        InvalidArgument: naming the first field that is wrong.
    """
    text("metadata.name", config.metadata.name, limit=MAX_NAME, required=True)
    text("image.image", config.image.image, limit=MAX_TEXT, required=True)
    string_map("labels", config.labels)
    string_map("annotations", config.annotations)
    words("command", config.command)
    words("args", config.args)
    text("working_dir", config.working_dir)
    if len(config.envs) > MAX_LIST * 32:
        raise InvalidArgument(f"envs has {len(config.envs)} entries, more than {MAX_LIST * 32}")
    for e in config.envs:
        text("envs key", e.key, limit=MAX_KEY, required=True)
        if len(e.value) > MAX_VALUE or b"\0" in e.value:
            raise InvalidArgument(f"envs[{quote(e.key, 20)}] is longer than {MAX_VALUE} bytes or contains a NUL")
    if len(config.mounts) > MAX_LIST:
        raise InvalidArgument(f"mounts has {len(config.mounts)} entries, more than {MAX_LIST}")
    for i, m in enumerate(config.mounts):
        absolute_path(f"mounts[{i}].container_path", m.container_path)
        absolute_path(f"mounts[{i}].host_path", m.host_path, required=False)
        mount_options(f"mounts[{i}]", m)
    resources("linux.resources", config.linux.resources)


MAX_SYSCTLS = 256
# Dot- or slash-separated words, as Kubernetes names sysctls (the guest checks them again).
_SYSCTL = re.compile(r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?([./][a-zA-Z0-9]([-_a-zA-Z0-9.]*[a-zA-Z0-9])?)*\Z")


def sysctls(values: Mapping[str, str]) -> None:
    """Pod sysctls: any key of the guest kernel (the VM is the pod's own), well formed and bounded."""
    if len(values) > MAX_SYSCTLS:
        raise InvalidArgument(f"linux.sysctls has {len(values)} entries, more than {MAX_SYSCTLS}")
    for name, value in values.items():
        if len(name) > 256 or not _SYSCTL.match(name) or ".." in name:
            raise InvalidArgument(f"linux.sysctls: {quote(name, 64)} is not a sysctl name")
        if len(value) > 4096 or "\0" in value or "\n" in value:
            raise InvalidArgument(f"linux.sysctls[{name}]: the value is longer than 4096 or has a NUL or newline")


def mount_options(field: str, m: cri.Mount) -> None:
    """Propagation and read-only flags that can be honoured (as containerd checks them)."""
    if m.propagation not in cri.MountPropagation.values():
        raise InvalidArgument(f"{field}.propagation: unknown value {m.propagation}")
    if m.propagation == cri.PROPAGATION_BIDIRECTIONAL:
        # Silently weaker would be worse: a CSI plugin's mounts would never reach the node.
        raise InvalidArgument(
            f"{field}.propagation: PROPAGATION_BIDIRECTIONAL cannot be honoured: a mount made in the pod's VM "
            f"cannot appear on the node (PROPAGATION_HOST_TO_CONTAINER can)"
        )
    if m.recursive_read_only and not m.readonly:
        raise InvalidArgument(f"{field}: recursive_read_only needs readonly")
    if m.recursive_read_only and m.propagation != cri.PROPAGATION_PRIVATE:
        raise InvalidArgument(
            f"{field}: recursive_read_only needs propagation PROPAGATION_PRIVATE "
            f"(a mount made later below it could not be read-only)"
        )
    if m.HasField("image") and m.image.image:
        raise InvalidArgument(f"{field}: image volumes are not supported")
    if m.uidMappings or m.gidMappings:
        raise InvalidArgument(f"{field}: id-mapped mounts are not supported (user namespaces are not)")


_UNIFIED_KEY = re.compile(r"^[a-z][a-z0-9_]*\.[A-Za-z0-9_.]+$")  # memory.high, hugetlb.2MB.max
_CPUSET = re.compile(r"^[0-9,\-]*$")


def resources(field: str, r: cri.LinuxContainerResources) -> None:
    """Container resources (CreateContainer, UpdateContainerResources): numbers not negative,
    cpusets as lists of numbers and ranges, cgroup v2 ``unified`` keys as controller files.

    Raises:
        InvalidArgument: naming the field.
    """
    for name in ("cpu_period", "cpu_quota", "cpu_shares", "memory_limit_in_bytes", "oom_score_adj"):
        value = getattr(r, name)
        if value < 0 and not (name == "cpu_quota" and value == -1) and name != "oom_score_adj":
            raise InvalidArgument(f"{field}.{name} must not be negative: {value}")
    if not -1000 <= r.oom_score_adj <= 1000:
        raise InvalidArgument(f"{field}.oom_score_adj must be between -1000 and 1000: {r.oom_score_adj}")
    for name in ("cpuset_cpus", "cpuset_mems"):
        value = getattr(r, name)
        if len(value) > 1024 or not _CPUSET.match(value):
            raise InvalidArgument(f"{field}.{name} must be a list of numbers and ranges: {quote(value)}")
    if len(r.unified) > 64:
        raise InvalidArgument(f"{field}.unified has {len(r.unified)} entries, more than 64")
    for key, value in r.unified.items():
        if not _UNIFIED_KEY.match(key) or len(key) > 64:
            raise InvalidArgument(f"{field}.unified key {quote(key)} is not a cgroup file name")
        text(f"{field}.unified[{quote(key, 20)}]", value, limit=1024)

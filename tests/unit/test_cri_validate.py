"""CRI input checked at the edge: each bad field is INVALID_ARGUMENT naming it, with a short quote."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from kvmsandbox.cri import validate
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.errors import InvalidArgument


def good_pod() -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", uid="u-1", namespace="default"),
        log_directory="/var/log/pods/default_web_u-1",
        hostname="web",
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: setattr(c.metadata, "name", "we\x00b"), "metadata.name"),
        (lambda c: setattr(c.metadata, "name", "x" * 1_000_000), "metadata.name"),
        (lambda c: setattr(c.metadata, "namespace", ""), "metadata.namespace"),
        (lambda c: setattr(c.metadata, "uid", "a\nb"), "metadata.uid"),
        (lambda c: setattr(c, "log_directory", "relative/dir"), "log_directory"),
        (lambda c: setattr(c, "log_directory", "/var/log/../../etc"), "log_directory"),
        (lambda c: c.labels.__setitem__("k\x00", "v"), "labels key"),
        (lambda c: c.annotations.__setitem__("k", "v" * (300 * 1024)), "annotations"),
        (lambda c: c.dns_config.servers.append("1.1.1.1\x00"), "dns_config.servers[0]"),
        (lambda c: c.port_mappings.append(cri.PortMapping(host_port=70000)), "port_mappings[0].host_port"),
        (lambda c: c.port_mappings.append(cri.PortMapping(host_ip="not-an-ip")), "port_mappings[0].host_ip"),
        (lambda c: setattr(c.linux, "cgroup_parent", "/kubepods/../../evil"), "linux.cgroup_parent"),
        (lambda c: c.linux.sysctls.__setitem__("kernel/../../etc/x", "1"), "linux.sysctls"),
        (lambda c: c.linux.sysctls.__setitem__("net.ipv4..x", "1"), "linux.sysctls"),
        (lambda c: c.linux.sysctls.__setitem__("", "1"), "linux.sysctls"),
        (lambda c: c.linux.sysctls.__setitem__("kernel.shmmax", "1\n2"), "linux.sysctls"),
        (lambda c: c.linux.sysctls.__setitem__("kernel.shmmax", "9" * 5000), "linux.sysctls"),
        (lambda c: c.linux.sysctls.update({f"net.k{i}": "1" for i in range(300)}), "linux.sysctls"),
    ],
)
def test_a_bad_pod_field_is_named(change, field: str) -> None:  # type: ignore[no-untyped-def]
    config = good_pod()
    change(config)
    with pytest.raises(InvalidArgument) as e:
        validate.pod_config(config)
    assert field in str(e.value) and len(str(e.value)) < 300


def test_a_good_pod_passes() -> None:
    validate.pod_config(good_pod())


def test_log_paths_stay_below_the_log_directory() -> None:
    d = "/var/log/pods/p"
    assert validate.log_path(d, "app/0.log") == Path("/var/log/pods/p/app/0.log")
    assert validate.log_path("", "app/0.log") is None and validate.log_path(d, "") is None
    for bad in ("../../etc/x.log", "/etc/x.log", ".", "app/", "a/../../b", "x\x00y", "y" * 5000):
        with pytest.raises(InvalidArgument, match="log_path"):
            validate.log_path(d, bad)


def test_hostnames_derived_from_long_pod_names_are_valid() -> None:
    long_name = "pod-sandbox-with-a-name-longer-than-sixty-four-characters-" + "a1b2c3d4e5f6" * 3
    derived = validate.hostname("", long_name)
    assert len(derived) <= 63 and derived == long_name[:63].rstrip("-.")
    assert validate.hostname("", "Name-") == "name"
    assert validate.hostname("", "---") == "localhost"
    assert validate.hostname("web-1.example", "ignored") == "web-1.example"
    for bad in ("x" * 65, "under_score", "-lead", "a..b"):
        with pytest.raises(InvalidArgument, match="hostname"):
            validate.hostname(bad, "p")


def test_container_fields() -> None:
    ok = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="busybox"))
    validate.container_config(ok)
    cases = [
        (cri.ContainerConfig(image=cri.ImageSpec(image="b")), "metadata.name"),
        (cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c")), "image.image"),
    ]
    bad_mount = cri.ContainerConfig()
    bad_mount.CopyFrom(ok)
    bad_mount.mounts.append(cri.Mount(container_path="/data", host_path="relative"))
    cases.append((bad_mount, "mounts[0].host_path"))
    bad_env = cri.ContainerConfig()
    bad_env.CopyFrom(ok)
    bad_env.envs.append(cri.KeyValue(key="A", value=b"x\x00"))
    cases.append((bad_env, "envs['A']"))
    bad_cmd = cri.ContainerConfig()
    bad_cmd.CopyFrom(ok)
    bad_cmd.command.extend(["sh", "-c\x00"])
    cases.append((bad_cmd, "command[1]"))
    for config, field in cases:
        with pytest.raises(InvalidArgument) as e:
            validate.container_config(config)
        assert field in str(e.value)


def test_timeouts_are_clamped() -> None:
    assert validate.timeout(-5) == 0
    assert validate.timeout(2**63 - 1) == validate.MAX_TIMEOUT_SECONDS
    assert validate.timeout(30) == 30


def test_stop_signals() -> None:
    assert validate.stop_signal("") == 15 and validate.stop_signal("KILL") == 9
    assert validate.stop_signal("SIGRTMIN+3") == signal.SIGRTMIN + 3  # systemd images (kindest/node)
    assert validate.stop_signal("sigquit") == validate.stop_signal("QUIT") == 3
    assert validate.stop_signal("RTMAX-1") == signal.SIGRTMAX - 1
    for bad in ("99999999999", "0", "SIGNOPE", "x" * 100):
        with pytest.raises(InvalidArgument, match=r"stop signal|StopSignal"):
            validate.stop_signal(bad)


def test_resources() -> None:
    ok = cri.LinuxContainerResources(
        cpu_quota=50000, cpu_period=100000, memory_limit_in_bytes=1 << 30, cpuset_cpus="0-3,6", oom_score_adj=-997
    )
    ok.unified["memory.high"] = "max"
    ok.unified["hugetlb.2MB.max"] = "0"
    validate.resources("linux.resources", ok)
    for change, field in [
        (lambda r: setattr(r, "memory_limit_in_bytes", -5), "memory_limit_in_bytes"),
        (lambda r: setattr(r, "cpuset_cpus", "0\n1"), "cpuset_cpus"),
        (lambda r: setattr(r, "oom_score_adj", 5000), "oom_score_adj"),
        (lambda r: r.unified.__setitem__("../../x", "1"), "unified key"),
    ]:
        bad = cri.LinuxContainerResources()
        change(bad)
        with pytest.raises(InvalidArgument, match=field):
            validate.resources("linux.resources", bad)


def test_long_commands_and_fqdn_hostnames() -> None:
    with pytest.raises(InvalidArgument, match="in all"):
        validate.words("cmd", ["x" * 4000] * 1000)
    assert validate.hostname("a" * 30 + "." + "b" * 33, "p") == "a" * 30 + "." + "b" * 33  # 64: an FQDN


def test_sysctls_with_dots_or_slashes_pass() -> None:
    validate.sysctls(
        {"kernel.shm_rmid_forced": "1", "net/ipv4/conf/eth0.1/forwarding": "1", "fs.mqueue.msg_max": "100"}
    )


@pytest.mark.parametrize(
    ("mount", "words"),
    [
        (cri.Mount(container_path="/m", host_path="/h", recursive_read_only=True), "needs readonly"),
        (
            cri.Mount(
                container_path="/m",
                host_path="/h",
                readonly=True,
                recursive_read_only=True,
                propagation=cri.PROPAGATION_HOST_TO_CONTAINER,
            ),
            "needs propagation PROPAGATION_PRIVATE",
        ),
        (cri.Mount(container_path="/m", host_path="/h", propagation=7), "unknown value 7"),  # type: ignore[arg-type]
        (
            cri.Mount(container_path="/m", host_path="/h", propagation=cri.PROPAGATION_BIDIRECTIONAL),
            "BIDIRECTIONAL cannot be honoured",
        ),
        (cri.Mount(container_path="/m", image=cri.ImageSpec(image="busybox")), "image volumes are not supported"),
        (
            cri.Mount(container_path="/m", host_path="/h", uidMappings=[cri.IDMapping(length=1)]),
            "id-mapped mounts are not supported",
        ),
    ],
)
def test_mount_options_that_cannot_be_honoured_are_refused(mount: cri.Mount, words: str) -> None:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="i"))
    config.mounts.append(mount)
    with pytest.raises(InvalidArgument, match=words):
        validate.container_config(config)

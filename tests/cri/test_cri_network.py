"""Pod networking through the CRI with real CNI plugins (bridge, host-local, portmap): pod to pod,
host to pod, a port mapping on loopback, nothing left after removal, broken configs."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from tests.cri.conftest import TEST_BRIDGE, TEST_SUBNET, CriServer
from tests.cri.test_cri_lifecycle import container_config, pod_config
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

HTTPD = 'mkdir -p /www && echo "hello from $(hostname)" > /www/index.html && exec httpd -f -p 80 -h /www'


def netns_names() -> set[str]:
    return {p.name for p in Path("/run/netns").iterdir()} if Path("/run/netns").exists() else set()


def links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout


def link_names() -> set[str]:
    """Host interfaces, but the test bridge (the first pod of the session makes it, and it stays)."""
    names = {line.split(":")[1].strip().split("@")[0] for line in links().splitlines()}
    return names - {TEST_BRIDGE}


def nat_rules() -> str:
    return subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout


def filter_rules() -> str:
    return subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True, check=True).stdout


def cni_cache(cri_server: CriServer) -> list[str]:
    """What the runtime keeps of running pods' CNI ADD (needed for their DEL)."""
    cache = cri_server.state_dir / "cni"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def leases(ipam_dir: Path) -> list[str]:
    # host-local keeps one file per leased IP (named by the IP) plus its own bookkeeping files.
    return sorted(p.name for p in ipam_dir.rglob("*") if p.is_file() and p.name[0].isdigit())


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def wait_http(url: str, deadline_seconds: float = 60) -> str:
    return wait_until(lambda: http_get(url), deadline_seconds, f"{url} to answer", interval=0.5, ignore=(OSError,))


@pytest.fixture(scope="module")
def image(cri_server: CriServer, busybox_image: str) -> str:
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    return busybox_image


def start(cri_server: CriServer, pod_id: str, config: cri.PodSandboxConfig, name: str, image: str, script: str) -> str:
    rt = cri_server.runtime
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container_config(name, image, script), sandbox_config=config
        )
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    return str(cid)


def test_pods_reach_each_other_the_host_reaches_them_and_a_port_mapping_works(
    cri_server: CriServer, image: str, tmp_path: Path
) -> None:
    rt = cri_server.runtime
    ipam_dir = cri_server.config_path.parent / "ipam"
    before_ns, before_leases = netns_names(), leases(ipam_dir)
    config_a = pod_config("net-a", tmp_path)
    config_a.port_mappings.append(
        cri.PortMapping(protocol=cri.TCP, container_port=80, host_port=18080, host_ip="127.0.0.1")
    )
    config_b = pod_config("net-b", tmp_path)
    pod_a = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config_a), timeout=600).pod_sandbox_id
    pod_b = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config_b), timeout=600).pod_sandbox_id
    removed = False
    try:
        ip_a = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_a)).status.network.ip
        ip_b = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_b)).status.network.ip
        prefix = TEST_SUBNET.rsplit(".", 1)[0] + "."
        assert ip_a.startswith(prefix) and ip_b.startswith(prefix) and ip_a != ip_b
        assert len(leases(ipam_dir)) == len(before_leases) + 2

        start(cri_server, pod_a, config_a, "web", image, HTTPD)
        client = start(cri_server, pod_b, config_b, "client", image, "sleep 600")

        # Host to pod, by pod IP (the host is the bridge's gateway).
        assert wait_http(f"http://{ip_a}/").strip() == "hello from net-a"
        # Pod to pod, by pod IP.
        out = rt.ExecSync(
            cri.ExecSyncRequest(container_id=client, cmd=["wget", "-q", "-O", "-", f"http://{ip_a}/"], timeout=60)
        )
        assert out.exit_code == 0, out.stderr
        assert out.stdout.decode().strip() == "hello from net-a"
        # The guest has the CNI address and routes, and DNS from the pod config.
        out = rt.ExecSync(cri.ExecSyncRequest(container_id=client, cmd=["ip", "-4", "addr", "show"], timeout=60))
        assert f"inet {ip_b}/" in out.stdout.decode()
        resolv = rt.ExecSync(cri.ExecSyncRequest(container_id=client, cmd=["cat", "/etc/resolv.conf"], timeout=60))
        assert "nameserver 127.0.0.53" in resolv.stdout.decode()
        # A host port on loopback reaches the pod through the portmap plugin.
        assert wait_http("http://127.0.0.1:18080/").strip() == "hello from net-a"
        assert pod_a in nat_rules() or "18080" in nat_rules()

        info = json.loads(
            rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_a, verbose=True)).info["info"]
        )
        netns, tap = info["network"]["netns"], info["network"]["tap"]
        assert netns in netns_names()
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_a))
        # Stop released the network (CNI DEL): the lease and the port mapping are gone, the
        # namespace stays until removal; a second stop is fine.
        assert len(leases(ipam_dir)) == len(before_leases) + 1
        assert "18080" not in nat_rules()
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_a))
        assert rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_a)).status.network.ip == ""
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_a))
        # Pod B is removed without a stop first: removal releases its network as well.
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_b))
        removed = True
        assert netns_names() == before_ns
        assert tap not in links()
        assert leases(ipam_dir) == before_leases
        rules = nat_rules() + filter_rules()
        assert pod_a not in rules and pod_b not in rules
        assert cni_cache(cri_server) == []
    finally:
        if not removed:
            for pod in (pod_a, pod_b):
                rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
                rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def test_host_network_pods_are_refused(cri_server: CriServer, tmp_path: Path) -> None:
    config = pod_config("hostnet", tmp_path)
    config.linux.security_context.namespace_options.network = cri.NODE
    with pytest.raises(grpc.RpcError) as e:
        cri_server.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "host network" in e.value.details()  # type: ignore[attr-defined]


@pytest.fixture
def conf_dir(cri_server: CriServer) -> Iterator[Path]:
    """The server's CNI conf dir; whatever a test writes there is undone afterwards."""
    d = cri_server.config_path.parent / "net.d"
    saved = {p.name: p.read_bytes() for p in d.iterdir()}
    yield d
    shutil.rmtree(d)
    d.mkdir()
    for name, data in saved.items():
        (d / name).write_bytes(data)


def network_condition(cri_server: CriServer) -> cri.RuntimeCondition:
    conditions = cri_server.runtime.Status(cri.StatusRequest()).status.conditions
    return next(c for c in conditions if c.type == "NetworkReady")


def test_network_ready_follows_the_cni_config(cri_server: CriServer, conf_dir: Path, tmp_path: Path) -> None:
    assert network_condition(cri_server).status is True
    good = next(conf_dir.iterdir())
    good.write_text("{ not json")
    cond = network_condition(cri_server)
    assert cond.status is False and cond.reason == "NetworkPluginNotReady"
    assert good.name in cond.message
    before = netns_names()
    with pytest.raises(grpc.RpcError) as e:
        cri_server.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("no-net", tmp_path)))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "network is not ready" in e.value.details()  # type: ignore[attr-defined]
    assert netns_names() == before
    names = [p.metadata.name for p in cri_server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items]
    assert "no-net" not in names


def test_a_failing_plugin_fails_the_pod_cleanly(cri_server: CriServer, conf_dir: Path, tmp_path: Path) -> None:
    good = next(conf_dir.iterdir())
    conflist = json.loads(good.read_text())
    # A subnet host-local refuses: the bridge plugin runs, then its IPAM fails.
    conflist["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "10.78.1.0/33"}]]
    good.write_text(json.dumps(conflist))
    ipam_dir = cri_server.config_path.parent / "ipam"
    before = (netns_names(), link_names(), leases(ipam_dir), cni_cache(cri_server), nat_rules().count("\n"))
    with pytest.raises(grpc.RpcError) as e:
        cri_server.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("bad-ipam", tmp_path)))
    # The plugin's own words, not those of the failed undo.
    assert "10.78.1.0/33" in e.value.details()  # type: ignore[attr-defined]
    assert "could not add" in e.value.details()  # type: ignore[attr-defined]
    after = (netns_names(), link_names(), leases(ipam_dir), cni_cache(cri_server), nat_rules().count("\n"))
    assert after == before
    names = [p.metadata.name for p in cri_server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items]
    assert "bad-ipam" not in names

"""The warm pool through the CRI, on real guests: clones restored ahead serve a template handler's
pods, the pool refills, gives its clones back when memory is short, and leaves nothing when the
server stops or crashes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.guest_image import GuestImage
from kvmsandbox.hypervisor.process import start_time
from tests.conftest import CACHE_DIR
from tests.cri.conftest import CriServer, write_cni_config
from tests.cri.test_cri_lifecycle import container_config, pod_config
from tests.vm.leaks import processes_mentioning
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

TEMPLATE = "kvmsandbox-template"
BRIDGE = "kvsbwarm0"
SUBNET = "10.81.0.0/24"
POOL = 2


def make_server(base: Path, work: Path, *, floor_mib: int = 256) -> CriServer:
    config = {
        "state_dir": str(base / "s"),
        "run_dir": str(base / "r"),
        "cache_dir": str(CACHE_DIR),
        "socket": str(base / "cri.sock"),
        "runtime_handlers": ["kvmsandbox", TEMPLATE],
        "hypervisor": {"backend": "qemu"},
        "templates": {"handlers": [TEMPLATE], "warm_pool": POOL, "warm_pool_min_available_mib": floor_mib},
        "agent": {"ready_timeout_seconds": 240},
        "network": {"cni_conf_dirs": [str(write_cni_config(work / "net.d", work / "ipam", BRIDGE, SUBNET))]},
    }
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return CriServer(config_path, Path(config["socket"]), base / "s", work / "serve.log")


@pytest.fixture(scope="module")
def server(guest_image: GuestImage, short_tmp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriServer]:
    srv = make_server(short_tmp / "warm", tmp_path_factory.mktemp("warm"))
    srv.start()
    yield srv
    if srv.channel is None:
        srv.start()
    for pod in srv.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
        srv.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=300)
    srv.stop()
    assert warm_processes() == []
    subprocess.run(["ip", "link", "del", "dev", BRIDGE], capture_output=True, check=False)


def warm_processes() -> list[int]:
    return processes_mentioning("guest=kvsb-warm-")


def pool_status(server: CriServer) -> dict[str, Any]:
    info = server.runtime.Status(cri.StatusRequest(verbose=True)).info["config"]
    status: dict[str, Any] = json.loads(info)["overhead"]["warm_pool"]
    return status


def wait_filled(server: CriServer) -> None:
    wait_until(lambda: pool_status(server)["waiting"] == POOL or None, 180, "the warm pool to fill", interval=0.5)


def test_pods_take_waiting_clones_and_the_pool_refills(server: CriServer, busybox_image: str, tmp_path: Path) -> None:
    rt = server.runtime
    server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    wait_filled(server)
    status = pool_status(server)
    assert status["pss_bytes"] > 0 and status["memory_mib"] == 256
    waiting = set(warm_processes())
    assert len(waiting) == POOL
    pods = []
    for i in range(POOL):
        config = pod_config(f"warm-{i}", tmp_path)
        pods.append(rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config, runtime_handler=TEMPLATE)).pod_sandbox_id)
    infos = [
        json.loads(rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=p, verbose=True)).info["info"])
        for p in pods
    ]
    assert all(i["warm"] and i["template"] for i in infos)
    ips = [rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=p)).status.network.ip for p in pods]
    assert ips[0] != ips[1] and all(ip.startswith("10.81.0.") for ip in ips)
    # A taken clone is the pod's: its console log is in the pod's dir and its QEMU in the pod's cgroup.
    assert all(Path(i["console_log"]).is_file() for i in infos)
    cgroups = {i["overhead"]["vmm_cgroup"] for i in infos}
    placed = {
        line.rsplit(":", 1)[1].strip()
        for pid in waiting
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if ":memory:" in line or line.startswith("0::")
    }
    assert cgroups <= placed, (cgroups, placed)
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=pods[0],
            config=container_config("c", busybox_image, "sleep 600"),
            sandbox_config=pod_config("warm-0", tmp_path),
        )
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    probe = ["sh", "-c", "hostname; cat /sys/class/net/eth0/address"]
    out = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=probe, timeout=60))
    hostname, mac = out.stdout.decode().split()
    assert hostname == "warm-0" and mac == infos[0]["network"]["mac"]
    # The pool refills behind the pods.
    wait_filled(server)
    for pod in pods:
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    # The clones the pods took are gone with them (exited: gone or a zombie of the node's init).
    assert [pid for pid in waiting if start_time(pid) is not None] == []


def test_a_crash_leaves_no_waiting_clone_behind(server: CriServer) -> None:
    wait_filled(server)
    before = warm_processes()
    assert len(before) == POOL
    server.kill()
    # The waiting clones outlive the crash; the next start removes them and fills anew.
    server.start()
    wait_until(lambda: all(start_time(pid) is None for pid in before) or None, 60, "the old clones to go")
    wait_filled(server)
    run_dir = Path(yaml.safe_load(server.config_path.read_text())["run_dir"])
    assert len(list(run_dir.glob("w-*"))) == POOL


def test_a_pool_below_its_memory_floor_restores_nothing(
    tmp_path_factory: pytest.TempPathFactory, short_tmp: Path
) -> None:
    # A floor above what this host has: the pool fills nothing and says why (giving clones back
    # under pressure is covered by tests/unit/test_warm_pool.py).
    srv = make_server(short_tmp / "warm2", tmp_path_factory.mktemp("warm2"), floor_mib=1 << 24)
    srv.start()
    try:
        status = wait_until(lambda: pool_status(srv) if "below" in pool_status(srv)["problem"] else None, 60, "")
        assert status["waiting"] == 0
    finally:
        srv.stop()

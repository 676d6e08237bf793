"""Pods of a template handler through the CRI, on real guests: clones of a VM template run
containers, exec, networking and stats as cold pods do, each with an identity of its own; damaged
templates give cold boots, not failed pods; a restart recovers clones; removal leaves nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.guest_image import GuestImage
from tests.conftest import CACHE_DIR
from tests.cri.conftest import CriServer, write_cni_config
from tests.cri.test_cri_lifecycle import container_config, pod_config
from tests.vm.leaks import processes_mentioning
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

TEMPLATE = "kvmsandbox-template"
COLD = "kvmsandbox"
BRIDGE = "kvsbtmpl0"
SUBNET = "10.80.0.0/24"
HTTPD = 'mkdir -p /www && echo "hello from $(hostname)" > /www/index.html && exec httpd -f -p 80 -h /www'
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(guest_image: GuestImage, short_tmp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriServer]:
    """A qemu-backend server with a template handler and a cold one."""
    base = short_tmp / "tmpl"
    work = tmp_path_factory.mktemp("templates")
    config = {
        "state_dir": str(base / "s"),
        "run_dir": str(base / "r"),
        "cache_dir": str(CACHE_DIR),
        "socket": str(base / "cri.sock"),
        "runtime_handlers": [COLD, TEMPLATE],
        "hypervisor": {"backend": "qemu"},
        "templates": {"handlers": [TEMPLATE], "memory_classes_mib": [256, 512]},
        "agent": {"ready_timeout_seconds": 240},
        "network": {"cni_conf_dirs": [str(write_cni_config(work / "net.d", work / "ipam", BRIDGE, SUBNET))]},
    }
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    srv = CriServer(config_path, Path(config["socket"]), base / "s", work / "serve.log")
    srv.start()
    yield srv
    if srv.channel is None:
        srv.start()
    for pod in srv.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
        srv.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=300)
    srv.stop()
    subprocess.run(["ip", "link", "del", "dev", BRIDGE], capture_output=True, check=False)


@pytest.fixture(scope="module")
def image(server: CriServer, busybox_image: str) -> str:
    server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    return busybox_image


@pytest.fixture(autouse=True)
def _pods_removed(server: CriServer) -> Iterator[None]:
    yield
    if server.channel is None:
        server.start()
    for pod in server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
        server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=300)


def run_pod(server: CriServer, name: str, log_dir: Path, handler: str = TEMPLATE, memory: int = 0) -> str:
    config = pod_config(name, log_dir)
    if memory:
        config.linux.resources.memory_limit_in_bytes = memory << 20
    request = cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
    return str(server.runtime.RunPodSandbox(request, timeout=600).pod_sandbox_id)


def vm_info(server: CriServer, pod: str) -> dict[str, Any]:
    status = server.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True))
    info: dict[str, Any] = json.loads(status.info["info"])
    info["ip"] = status.status.network.ip
    return info


def start(server: CriServer, pod: str, name: str, image: str, script: str, log_dir: Path) -> str:
    rt = server.runtime
    config = container_config(name, image, script)
    request = cri.CreateContainerRequest(pod_sandbox_id=pod, config=config, sandbox_config=pod_config(name, log_dir))
    cid = str(rt.CreateContainer(request).container_id)
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    return cid


def sh(server: CriServer, container: str, script: str) -> str:
    out = server.runtime.ExecSync(cri.ExecSyncRequest(container_id=container, cmd=["sh", "-c", script], timeout=60))
    assert out.exit_code == 0, out.stderr.decode()
    return str(out.stdout.decode())


def cli(server: CriServer, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kvmsandbox.cli", "--config", str(server.config_path), "template", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def templates_dir(server: CriServer) -> Path:
    return server.state_dir / "templates"


def test_clones_run_like_cold_pods_each_with_its_own_identity(server: CriServer, image: str, tmp_path: Path) -> None:
    pods = [run_pod(server, f"clone-{i}", tmp_path) for i in range(2)]
    infos = [vm_info(server, pod) for pod in pods]
    key = infos[0]["template"]
    assert key and all(i["template"] == key and i["shared_fs"] == "none" for i in infos)
    memory_file = templates_dir(server) / key / "memory"
    before = hashlib.sha256(memory_file.read_bytes()).hexdigest()

    web = start(server, pods[0], "web", image, HTTPD, tmp_path)
    client = start(server, pods[1], "client", image, "sleep 600", tmp_path)
    probe = "hostname; cat /sys/class/net/eth0/address; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo"
    seen = [sh(server, c, probe).split("\n") for c in (web, client)]
    assert [s[0] for s in seen] == ["clone-0", "clone-1"]
    macs = [s[1] for s in seen]
    assert macs[0] != macs[1] and all(m == i["network"]["mac"] for m, i in zip(macs, infos, strict=True))
    assert seen[0][2] != seen[1][2] and len(seen[0][2]) == 64
    ips = [i["ip"] for i in infos]
    assert ips[0] != ips[1] and all(ip.startswith("10.80.0.") for ip in ips)
    # The clock is the host's, not the moment the template was saved.
    assert abs(int(sh(server, client, "date +%s")) - time.time()) < 30

    # Networking: one clone serves, the other fetches by pod IP.
    fetched = wait_until(
        lambda: sh(server, client, f"wget -q -O - http://{ips[0]}/ || true").strip() or None,
        60,
        "the web clone to answer",
        interval=0.5,
    )
    assert fetched == "hello from clone-0"

    # One clone's writes reach neither the other clone nor the template.
    sh(server, web, "head -c 8388608 /dev/zero | tr '\\0' 'W' > /dev/shm/mark && sync")
    assert sh(server, client, "ls /dev/shm").strip() == ""
    third = run_pod(server, "clone-2", tmp_path)
    probe_c = start(server, third, "probe", image, "sleep 600", tmp_path)
    assert sh(server, probe_c, "ls /dev/shm").strip() == ""
    assert hashlib.sha256(memory_file.read_bytes()).hexdigest() == before

    stats = server.runtime.ContainerStats(cri.ContainerStatsRequest(container_id=web)).stats
    assert stats.memory.working_set_bytes.value > 0 and stats.cpu.usage_core_nano_seconds.value > 0


def test_sizes_round_up_to_a_class_and_a_larger_pod_boots_cold(server: CriServer, tmp_path: Path) -> None:
    small = run_pod(server, "size-small", tmp_path, memory=64)
    big = run_pod(server, "size-big", tmp_path, memory=1024)
    small_info, big_info = vm_info(server, small), vm_info(server, big)
    assert small_info["memory_mib"] in (256, 512) and small_info["template"]
    assert big_info["template"] == "" and big_info["shared_fs"] == "virtio-fs"
    assert "above the largest memory class" in server.log.read_text()


def test_host_paths_are_refused_in_a_clone_and_work_in_a_cold_pod(
    server: CriServer, image: str, tmp_path: Path
) -> None:
    shared = tmp_path / "data"
    shared.mkdir()
    (shared / "f").write_text("from the host\n")
    for handler in (TEMPLATE, COLD):
        pod = run_pod(server, f"paths-{handler[-4:]}", tmp_path, handler=handler)
        config = container_config("c", image, "sleep 600")
        config.mounts.append(cri.Mount(container_path="/data", host_path=str(shared), readonly=True))
        request = cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config("p", tmp_path)
        )
        if handler == TEMPLATE:
            with pytest.raises(grpc.RpcError) as e:
                server.runtime.CreateContainer(request)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "VM template" in str(e.value.details()) and "host paths" in str(e.value.details())
        else:
            cid = server.runtime.CreateContainer(request).container_id
            server.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))
            assert sh(server, cid, "cat /data/f") == "from the host\n"


def test_damaged_templates_give_cold_boots_and_a_changed_image_a_new_template(
    server: CriServer, guest_image: GuestImage, tmp_path: Path
) -> None:
    key = vm_info(server, run_pod(server, "first", tmp_path))["template"]
    directory = templates_dir(server) / key

    # A state QEMU refuses (its checksum right: as a QEMU change the key missed would make it):
    # the clone does not restore and the pod boots cold; the template rests.
    state = (directory / "state").read_bytes()
    meta = json.loads((directory / "meta.json").read_text())
    server.stop()
    bad = state[:100]
    (directory / "state").write_bytes(bad)
    damaged = {**meta, "state_bytes": len(bad), "state_sha256": hashlib.sha256(bad).hexdigest()}
    (directory / "meta.json").write_text(json.dumps(damaged))
    server.start()
    try:
        info = vm_info(server, run_pod(server, "bad-state", tmp_path))
        assert info["template"] == "" and info["shared_fs"] == "virtio-fs"
        assert "failed, booting cold" in server.log.read_text()
    finally:
        (directory / "state").write_bytes(state)
        (directory / "meta.json").write_text(json.dumps(meta))

    # A corrupt memory file is found when the (restarted) server loads it.
    server.stop()
    with open(directory / "memory", "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(64))
    server.start()
    info = vm_info(server, run_pod(server, "bad-memory", tmp_path))
    assert info["template"] == ""
    assert "does not match its checksum" in server.log.read_text()
    cli(server, "rm", key)

    # Missing: built again on first use.
    assert vm_info(server, run_pod(server, "rebuilt", tmp_path))["template"] == key

    # A changed guest image names another template; the old one is listed stale until removed.
    rootfs = guest_image.rootfs
    times = rootfs.stat()
    os.utime(rootfs, ns=(times.st_atime_ns, times.st_mtime_ns + 1_000_000_000))
    try:
        new_key = vm_info(server, run_pod(server, "new-image", tmp_path))["template"]
        assert new_key and new_key != key
        listed = cli(server, "list")
        assert f"{key}" in listed and "stale" in listed and "current" in listed
        cli(server, "rm", "--stale")
        assert key not in cli(server, "list")
    finally:
        os.utime(rootfs, ns=(times.st_atime_ns, times.st_mtime_ns))
    cli(server, "rm", new_key)


def test_clones_survive_a_server_kill_and_leave_nothing_once_removed(
    server: CriServer, image: str, tmp_path: Path
) -> None:
    pod = run_pod(server, "survivor", tmp_path)
    info = vm_info(server, pod)
    cid = start(server, pod, "c", image, "sleep 600", tmp_path)
    server.kill()
    # What a build killed with the server would leave: its work dirs and run dir.
    run_dir = Path(yaml.safe_load(server.config_path.read_text())["run_dir"])
    leftovers = [templates_dir(server) / ".build-dead", templates_dir(server) / ".new-dead", run_dir / "t-dead"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "memory").write_bytes(b"x")
    server.start()
    assert not any(leftover.exists() for leftover in leftovers)
    status = server.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status
    assert status.state == cri.SANDBOX_READY
    assert sh(server, cid, "hostname").strip() == "survivor"
    server.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod))
    server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert processes_mentioning(info["vm"]) == []
    assert [p.name for p in run_dir.iterdir() if p.is_dir()] == []
    # The last clone gone, the template stays until `template rm`.
    assert (templates_dir(server) / info["template"] / "memory").exists()

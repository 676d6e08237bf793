"""Pod overhead through the CRI: VM sizing from the pod's limits, the warning when the declared
overhead is below the measured one, the VMM in the pod's cgroup, pod stats that include the VM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.host.cgroups import HostCgroup
from kvmsandbox.overhead.model import Measurement, Sample
from tests.cri.conftest import CriServer
from tests.cri.test_cri_lifecycle import container_config, pod_config

pytestmark = pytest.mark.vm
MIB = 1024 * 1024


def run_pod(cri_server: CriServer, name: str, tmp_path: Path, linux: cri.LinuxPodSandboxConfig) -> str:
    config = pod_config(name, tmp_path)
    config.linux.CopyFrom(linux)
    return str(cri_server.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=600).pod_sandbox_id)


def pod_info(cri_server: CriServer, pod_id: str) -> dict:  # type: ignore[type-arg]
    resp = cri_server.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    return json.loads(resp.info["info"])  # type: ignore[no-any-return]


def remove_pod(cri_server: CriServer, pod_id: str) -> None:
    cri_server.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    cri_server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def test_a_pod_declaring_too_little_overhead_is_sized_warned_and_accounted(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    rt = cri_server.runtime
    parent = f"/kvmsandbox-test-pods/pod{tmp_path.name}"
    linux = cri.LinuxPodSandboxConfig(
        cgroup_parent=parent,
        # What the kubelet sends: the containers' limits summed, and the RuntimeClass's podFixed.
        resources=cri.LinuxContainerResources(
            memory_limit_in_bytes=200 * MIB, cpu_period=100_000, cpu_quota=150_000, cpu_shares=1536
        ),
        overhead=cri.LinuxContainerResources(memory_limit_in_bytes=1 * MIB, cpu_period=100_000, cpu_quota=1_000),
    )
    pod_id = run_pod(cri_server, "small-overhead", tmp_path, linux)
    try:
        info = pod_info(cri_server, pod_id)
        # No node measurement in this server's state dir: 96 MiB for the guest (config default),
        # so 200 + 96 + 200/64 = 299.1 MiB, rounded up to 300; 1.5 CPUs -> 2 vCPUs.
        assert info["memory_mib"] == 300, info["overhead"]["sizing"]
        assert info["vcpus"] == 2
        overhead = info["overhead"]
        assert "below the measured" in overhead["warning"]
        assert overhead["measured"]["source"].startswith("this pod's own figures at boot")
        assert overhead["declared"] == {"memory_bytes": MIB, "cpu_millicores": 10}
        assert overhead["measured"]["memory_bytes"] > 16 * MIB
        # The VMM runs in a cgroup below the pod's cgroup.
        assert overhead["vmm_cgroup"] == f"{parent}/kvmsandbox-{pod_id[:16]}"
        assert HostCgroup(overhead["vmm_cgroup"]).pids()
        status = rt.Status(cri.StatusRequest(verbose=True))
        node = json.loads(status.info["config"])["overhead"]
        assert pod_id in [p["pod_sandbox_id"] for p in node["pods_declaring_too_little"]]
        assert "kvmsandbox overhead measure" in node["problem"]
        assert "declared overhead (RuntimeClass overhead.podFixed) is too low" in cri_server.log.read_text()

        # Pod stats include the VM; the containers' figures come from the guest.
        cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
        cfg = container_config("idle", busybox_image, "sleep 600")
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg, sandbox_config=pod_config("x", tmp_path))
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))
        stats = rt.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id)).stats.linux
        containers_ws = sum(c.memory.working_set_bytes.value for c in stats.containers)
        assert [c.attributes.id for c in stats.containers] == [cid]
        assert stats.memory.working_set_bytes.value > containers_ws + 16 * MIB
        assert stats.cpu.usage_core_nano_seconds.value > sum(
            c.cpu.usage_core_nano_seconds.value for c in stats.containers
        )
    finally:
        remove_pod(cri_server, pod_id)
    # The VMM's cgroup and the parents the runtime created are gone.
    assert not HostCgroup(f"{parent}/kvmsandbox-{pod_id[:16]}").exists()
    assert not HostCgroup(parent).exists()


def test_the_node_measurement_drives_sizing_and_the_check(cri_server: CriServer, tmp_path: Path) -> None:
    sample = Sample(
        memory={
            "guest_kernel_reserved": 50 * MIB,
            "guest_idle_used": 40 * MIB,
            "vmm_beyond_guest_ram": 100 * MIB,
            "runtime_share": 2 * MIB,
        },
        cpu={"vmm_idle": 30.0, "runtime_idle": 1.0},
    )
    path = cri_server.state_dir / "overhead.json"
    Measurement(samples=[sample], margin_percent=10.0, conditions={"accel": "tcg"}).save(path)
    try:
        # Enough declared (Kata's 320Mi / 250m covers 192 MiB and 31m): no warning.
        linux = cri.LinuxPodSandboxConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=128 * MIB),
            overhead=cri.LinuxContainerResources(memory_limit_in_bytes=320 * MIB, cpu_period=100_000, cpu_quota=25_000),
        )
        pod_id = run_pod(cri_server, "enough-overhead", tmp_path, linux)
        try:
            info = pod_info(cri_server, pod_id)
            # 128 + 90 (the measured guest need) + 2 = 220 MiB.
            assert info["memory_mib"] == 220
            assert "warning" not in info["overhead"]
            assert info["overhead"]["measured"] == {
                "memory_bytes": 192 * MIB,
                "cpu_millicores": 31.0,
                "source": f"node measurement {path}",
            }
            node = json.loads(cri_server.runtime.Status(cri.StatusRequest(verbose=True)).info["config"])["overhead"]
            assert node["recommended_pod_fixed"] == {"memory_bytes": 212 * MIB, "cpu_millicores": 40}
            assert pod_id not in [p["pod_sandbox_id"] for p in node["pods_declaring_too_little"]]
        finally:
            remove_pod(cri_server, pod_id)
    finally:
        path.unlink()

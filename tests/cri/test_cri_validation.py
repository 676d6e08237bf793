"""Requests a new user or a fuzzer sends, against a real server: each bad field is INVALID_ARGUMENT
before any side effect, nothing is left behind, the server still starts, and the timeouts callers
give are honoured."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from tests.cri.conftest import CriServer
from tests.registry import Registry, image_config, make_layer, push_image
from tests.vm.leaks import processes_mentioning

pytestmark = pytest.mark.vm

# Longer than a hostname may be (critest's pod names are).
LONG_NAME = "pod-sandbox-with-a-name-longer-than-sixty-four-characters-" + "0123456789abcdef" * 2


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value.code(), e.value.details()  # type: ignore[attr-defined]


def pod(name: str, log_dir: str = "") -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name[:20]}", namespace="default"), log_directory=log_dir
    )


def test_bad_pod_configs_leave_nothing_and_the_server_still_starts(cri_server: CriServer, tmp_path: Path) -> None:
    rt = cri_server.runtime
    sandboxes = cri_server.state_dir / "sandboxes"
    before = sorted(p.name for p in sandboxes.iterdir())
    bad = {
        "metadata.name": pod("we\x00b"),
        "log_directory": pod("rel", log_dir="relative/logs"),
        "hostname": cri.PodSandboxConfig(metadata=pod("h").metadata, hostname="under_score"),
        "labels key": cri.PodSandboxConfig(metadata=pod("l").metadata, labels={"k\x00": "v"}),
    }
    for field, config in bad.items():
        code, details = code_of(lambda config=config: rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details, details
    assert not rt.ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert sorted(p.name for p in sandboxes.iterdir()) == before
    cri_server.stop()
    cri_server.start()
    assert cri_server.runtime.Version(cri.VersionRequest()).runtime_name == "kvmsandbox"


@pytest.fixture(scope="module")
def bad_stop_signal_image(cri_registry: Registry, busybox_layer: Path) -> str:
    layer = make_layer(busybox_layer)
    config = image_config([layer], Cmd=["sh"], StopSignal="99999999999")
    push_image(cri_registry, "test/badstop", "1.0", [layer], config=config)
    return f"{cri_registry.host}/test/badstop:1.0"


def test_a_long_pod_name_log_paths_exec_timeouts_and_image_stop_signals(
    cri_server: CriServer, busybox_image: str, bad_stop_signal_image: str, tmp_path: Path
) -> None:
    rt, img = cri_server.runtime, cri_server.images
    for ref in (busybox_image, bad_stop_signal_image):
        img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)))
    logs = tmp_path / "logs"
    config = pod(LONG_NAME, str(logs))
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=600).pod_sandbox_id

    def container(name: str, image: str, log_path: str) -> cri.CreateContainerRequest:
        return cri.CreateContainerRequest(
            pod_sandbox_id=pod_id,
            sandbox_config=config,
            config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name=name),
                image=cri.ImageSpec(image=image),
                command=["sleep", "600"],
                log_path=log_path,
            ),
        )

    for log_path in ("../../escape.log", "/etc/kvmsandbox-escape.log", ".", "a/../../b.log"):
        code, details = code_of(lambda log_path=log_path: rt.CreateContainer(container("c", busybox_image, log_path)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "log_path" in details
    assert not Path("/etc/kvmsandbox-escape.log").exists() and not (tmp_path / "escape.log").exists()
    code, details = code_of(lambda: rt.CreateContainer(container("s", bad_stop_signal_image, "s.log")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "stop signal '99999999999'" in details
    assert not rt.ListContainers(cri.ListContainersRequest()).containers

    cid = rt.CreateContainer(container("app", busybox_image, "app/0.log")).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    # The pod's name is too long to be a hostname: it is cut to 63 characters, as the kubelet does.
    result = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["hostname"], timeout=60))
    assert result.stdout.decode().strip() == LONG_NAME[:63].rstrip("-")
    # ExecSync answers at its deadline, not when the command would have ended.
    t0 = time.monotonic()
    code, _ = code_of(lambda: rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sleep", "30"], timeout=1)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 6
    # Numbers beyond what the runtime can do are clamped, not INTERNAL.
    huge = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=2**63 - 1))
    assert huge.exit_code == 0
    rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=-5))
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not rt.ListPodSandbox(cri.ListPodSandboxRequest()).items


def test_a_silent_guest_costs_other_pods_nothing_in_node_wide_calls(cri_server: CriServer, busybox_image: str) -> None:
    """One pod's VM is frozen (SIGSTOP: its agent never answers); the node-wide calls still answer
    within a few seconds, the other pod's figures are live, the frozen one shows its last state."""
    rt = cri_server.runtime
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    pods, cids = [], []
    for name in ("alive", "frozen"):
        config = pod(name)
        pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=600).pod_sandbox_id
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(
                pod_sandbox_id=pod_id,
                sandbox_config=config,
                config=cri.ContainerConfig(
                    metadata=cri.ContainerMetadata(name="c"),
                    image=cri.ImageSpec(image=busybox_image),
                    command=["sleep", "600"],
                ),
            )
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))
        pods.append(pod_id)
        cids.append(cid)
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pods[1], verbose=True))
    frozen_vmm = processes_mentioning(json.loads(status.info["info"])["vm"])
    assert frozen_vmm
    for pid in frozen_vmm:
        os.kill(pid, signal.SIGSTOP)
    try:
        for call in (
            lambda: rt.ListContainers(cri.ListContainersRequest()).containers,
            lambda: rt.ListContainerStats(cri.ListContainerStatsRequest()).stats,
            lambda: rt.ListPodSandboxStats(cri.ListPodSandboxStatsRequest()).stats,
            lambda: rt.ListPodSandbox(cri.ListPodSandboxRequest()).items,
        ):
            t0 = time.monotonic()
            answer = call()
            took = time.monotonic() - t0
            print(f"with one guest frozen: {len(answer)} items in {took:.2f}s")
            assert took < 6, call
            assert len(answer) == 2
        listed = {c.id: c.state for c in rt.ListContainers(cri.ListContainersRequest()).containers}
        assert listed == {cids[0]: cri.CONTAINER_RUNNING, cids[1]: cri.CONTAINER_RUNNING}
        stats = {s.attributes.id: s for s in rt.ListContainerStats(cri.ListContainerStatsRequest()).stats}
        assert stats[cids[0]].memory.working_set_bytes.value > 0
        assert not stats[cids[1]].HasField("memory")
    finally:
        for pid in frozen_vmm:
            os.kill(pid, signal.SIGCONT)
    for pod_id in pods:
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not rt.ListPodSandbox(cri.ListPodSandboxRequest()).items

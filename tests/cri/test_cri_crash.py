"""``kill -9`` of the server at any moment: running pods are recovered with their containers, and
their logs carry on with no line lost or repeated; a call cut in the middle leaves nothing that
cannot be listed and removed."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.sandbox.logs import parse_cri_log
from tests.cri.conftest import CriServer
from tests.cri.test_cri_lifecycle import container_config, pod_config
from tests.cri.test_cri_network import netns_names
from tests.vm.leaks import mounts_inside, processes_mentioning
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

PODS = 6
# Each container counts on both streams, a few hundred lines a second.
COUNTER = "i=0; while true; do echo out $i; echo err $i >&2; i=$((i+1)); usleep 2000; done"
NUMBER = re.compile(rb"^(out|err) (\d+)$")


def _numbers(log: Path) -> dict[str, list[int]]:
    """The counters each stream wrote to the log, in order."""
    out: dict[str, list[int]] = {"stdout": [], "stderr": []}
    for stream, tag, content in parse_cri_log(log.read_text()):
        assert tag == "F", f"{log}: a line came in pieces: {content!r}"
        m = NUMBER.match(content.encode())
        assert m, f"{log}: not a counter line: {content!r}"
        out[stream].append(int(m.group(2)))
    return out


def _counted_past(log: Path, n: int) -> bool:
    numbers = _numbers(log) if log.exists() else {"stdout": [], "stderr": []}
    return all(len(v) > n for v in numbers.values())


def test_a_killed_server_loses_and_repeats_no_line_of_six_running_pods(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    rt = cri_server.runtime
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    pods: dict[str, tuple[str, Path]] = {}
    for i in range(PODS):
        config = pod_config(f"crash-{i}", tmp_path / f"pod{i}")
        pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=600).pod_sandbox_id
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(
                pod_sandbox_id=pod, config=container_config("count", busybox_image, COUNTER), sandbox_config=config
            )
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))
        pods[cid] = (pod, tmp_path / f"pod{i}" / "count" / "0.log")

    for lines in (200, 400):
        for _, log in pods.values():
            wait_until(lambda log=log, n=lines: _counted_past(log, n), 120, f"output in {log}", interval=0.3)
        cri_server.kill()
        time.sleep(1)  # the guests keep writing while no runtime reads
        cri_server.start()
        rt = cri_server.runtime
        listed = {c.id: c.state for c in rt.ListContainers(cri.ListContainersRequest()).containers}
        assert {cid: listed.get(cid) for cid in pods} == dict.fromkeys(pods, cri.CONTAINER_RUNNING)

    for _, log in pods.values():
        wait_until(lambda log=log: _counted_past(log, 800), 120, f"output after the restarts in {log}", interval=0.3)
    for cid in pods:
        rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=0))
    for pod, log in pods.values():
        numbers = _numbers(log)
        for stream, seen in numbers.items():
            assert seen == list(range(len(seen))), f"{log} {stream}: lost or repeated lines around {_first_break(seen)}"
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod))


def _first_break(seen: list[int]) -> str:
    for i, n in enumerate(seen):
        if n != i:
            return f"line {i}: {seen[max(0, i - 2) : i + 3]}"
    return "nowhere"


def _kill_during(cri_server: CriServer, call: Callable[[], object], after: float) -> None:
    """Starts ``call`` in a thread and kills the server ``after`` seconds later."""

    def run() -> None:
        with contextlib.suppress(grpc.RpcError):  # the server died under it
            call()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(after)
    cri_server.kill()
    t.join(60)
    cri_server.start()


def _everything_is_removable(cri_server: CriServer, before_ns: set[str]) -> None:
    rt = cri_server.runtime
    for pod in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items:
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=300)
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=300)
    assert not rt.ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert not rt.ListContainers(cri.ListContainersRequest()).containers
    sandboxes = cri_server.state_dir / "sandboxes"
    assert not list(sandboxes.iterdir())
    assert netns_names() == before_ns
    assert processes_mentioning(str(sandboxes)) == []
    assert mounts_inside(sandboxes) == []


@pytest.mark.parametrize("after", [0.5, 2.0, 4.0])
def test_a_kill_during_run_pod_sandbox_leaves_nothing_that_cannot_be_removed(
    cri_server: CriServer, tmp_path: Path, after: float
) -> None:
    before_ns = netns_names()
    config = pod_config("cut", tmp_path)
    rt = cri_server.runtime
    _kill_during(cri_server, lambda: rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=600), after)
    _everything_is_removable(cri_server, before_ns)


@pytest.mark.parametrize("after", [0.05, 0.3])
def test_a_kill_during_create_container_or_remove_pod_leaves_nothing_that_cannot_be_removed(
    cri_server: CriServer, busybox_image: str, tmp_path: Path, after: float
) -> None:
    before_ns = netns_names()
    rt = cri_server.runtime
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    config = pod_config("cut", tmp_path)
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=600).pod_sandbox_id
    request = cri.CreateContainerRequest(
        pod_sandbox_id=pod, config=container_config("c", busybox_image, "sleep 1000"), sandbox_config=config
    )
    _kill_during(cri_server, lambda: rt.CreateContainer(request, timeout=120), after)
    rt = cri_server.runtime
    for c in rt.ListContainers(cri.ListContainersRequest()).containers:
        rt.RemoveContainer(cri.RemoveContainerRequest(container_id=c.id))
    # The pod still works after the cut call.
    cid = rt.CreateContainer(request, timeout=120).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    _kill_during(cri_server, lambda: rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod)), after)
    _everything_is_removable(cri_server, before_ns)

"""The kubelet's sequence of CRI calls against ``kvmsandbox serve``, images from a real local
registry, with a restart of the server in the middle."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.sandbox.logs import parse_cri_log
from tests.cri.conftest import CriServer
from tests.vm.leaks import processes_mentioning
from tests.waiting import wait_until

pytestmark = pytest.mark.vm


def pod_config(name: str, log_dir: Path) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default", attempt=0),
        hostname=name,
        log_directory=str(log_dir),
        dns_config=cri.DNSConfig(servers=["127.0.0.53"], searches=["svc.cluster.local"]),
        labels={"app": name},
        # As kubelet sends a pod without shareProcessNamespace (the CRI's default, 0, is POD).
        linux=cri.LinuxPodSandboxConfig(
            security_context=cri.LinuxSandboxSecurityContext(namespace_options=cri.NamespaceOption(pid=cri.CONTAINER))
        ),
    )


def container_config(name: str, image: str, script: str) -> cri.ContainerConfig:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name),
        image=cri.ImageSpec(image=image),
        command=["sh", "-c", script],
        envs=[cri.KeyValue(key="GREETING", value=b"hello")],
        log_path=f"{name}/0.log",
        labels={"container": name},
        linux=cri.LinuxContainerConfig(
            security_context=cri.LinuxContainerSecurityContext(namespace_options=cri.NamespaceOption(pid=cri.CONTAINER))
        ),
    )


def wait_for_log_line(path: Path, *wanted: str, timeout: float = 60) -> list[tuple[str, str, str]]:
    """The log's entries once every wanted line is in it: stdout and stderr are pumped apart, so
    their lines may reach the log in any order."""

    def entries_with_wanted() -> list[tuple[str, str, str]] | None:
        entries = parse_cri_log(path.read_text()) if path.exists() else []
        contents = {content for _, _, content in entries}
        return entries if all(w in contents for w in wanted) else None

    return wait_until(entries_with_wanted, timeout, f"{wanted!r} in {path}", interval=0.2)


def test_kubelet_sequence_with_a_server_restart_in_the_middle(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    rt, img = cri_server.runtime, cri_server.images
    ref = img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image))).image_ref
    assert img.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=busybox_image))).image.id == ref

    config = pod_config("web", tmp_path)
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert status.status.state == cri.SANDBOX_READY and status.status.metadata.name == "web"
    vm_name = json.loads(status.info["info"])["vm"]

    script = "echo $GREETING from $(hostname); cat /etc/resolv.conf; echo oops >&2; while true; do sleep 1; done"
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container_config("app", busybox_image, script), sandbox_config=config
        )
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    log = tmp_path / "app" / "0.log"
    entries = wait_for_log_line(log, "hello from web", "nameserver 127.0.0.53", "oops")
    assert ("stdout", "F", "hello from web") in entries
    assert ("stdout", "F", "nameserver 127.0.0.53") in entries
    assert ("stderr", "F", "oops") in entries

    # Restart the server: the pod keeps running and everything carries on.
    cri_server.stop()
    assert processes_mentioning(vm_name)
    cri_server.start()
    rt = cri_server.runtime
    listed = rt.ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert [p.id for p in listed if p.id == pod_id] == [pod_id]
    c_status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert c_status.state == cri.CONTAINER_RUNNING and c_status.image_id == ref
    assert "@sha256:" in c_status.image_ref

    result = rt.ExecSync(
        cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "echo $((40 + 2)); exit 3"], timeout=60)
    )
    assert (result.stdout, result.exit_code) == (b"42\n", 3)
    with pytest.raises(grpc.RpcError) as e:
        rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sleep", "60"], timeout=2))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]

    stats = rt.ContainerStats(cri.ContainerStatsRequest(container_id=cid)).stats
    assert stats.memory.working_set_bytes.value > 0 and stats.cpu.usage_core_nano_seconds.value > 0
    pod_stats = rt.PodSandboxStats(cri.PodSandboxStatsRequest(pod_sandbox_id=pod_id)).stats
    assert [c.attributes.id for c in pod_stats.linux.containers] == [cid]

    rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=2))
    rt.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=2))
    c_status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert c_status.state == cri.CONTAINER_EXITED and c_status.exit_code == 137 and c_status.reason == "Error"

    # A container that ends by itself is Completed.
    done = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container_config("job", busybox_image, "exit 0"))
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=done))
    wait_until(
        lambda: rt.ContainerStatus(cri.ContainerStatusRequest(container_id=done)).status.state == cri.CONTAINER_EXITED,
        60,
        "the job container to exit",
        interval=0.3,
    )
    assert rt.ContainerStatus(cri.ContainerStatusRequest(container_id=done)).status.reason == "Completed"

    rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    rt.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert processes_mentioning(vm_name) == []
    stopped = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    assert stopped.state == cri.SANDBOX_NOTREADY
    with pytest.raises(grpc.RpcError) as e:
        rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container_config("late", busybox_image, "true"))
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not rt.ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert not rt.ListContainers(cri.ListContainersRequest()).containers
    assert not list((cri_server.state_dir / "sandboxes").iterdir())


def test_four_pods_started_in_parallel_all_become_ready(cri_server: CriServer, tmp_path: Path) -> None:
    rt = cri_server.runtime

    def run(i: int) -> str:
        config = pod_config(f"par-{i}", tmp_path)
        return str(rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=600).pod_sandbox_id)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(run, range(4)))
    try:
        states = {p.id: p.state for p in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items}
        assert all(states[i] == cri.SANDBOX_READY for i in ids)
        ready = rt.ListPodSandbox(
            cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(label_selector={"app": "par-2"}))
        ).items
        assert [p.metadata.name for p in ready] == ["par-2"]
    finally:
        for i in ids:
            rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=i))
            rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=i))


def test_missing_image_is_not_found_with_the_registrys_words(cri_server: CriServer, registry_host: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=f"{registry_host}/nothing:here")))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert "unknown" in e.value.details().lower()  # type: ignore[attr-defined]


def test_images_resources_and_log_reopen_through_the_cri(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    rt, img = cri_server.runtime, cri_server.images
    spec = cri.ImageSpec(image=busybox_image)
    image_id = img.PullImage(cri.PullImageRequest(image=spec)).image_ref
    listed = img.ListImages(cri.ListImagesRequest(filter=cri.ImageFilter(image=spec))).images
    assert [i.id for i in listed] == [image_id] and busybox_image in listed[0].repo_tags
    fs = img.ImageFsInfo(cri.ImageFsInfoRequest()).image_filesystems[0]
    assert fs.used_bytes.value > 0 and fs.inodes_used.value > 0

    config = pod_config("tuned", tmp_path)
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    try:
        container = container_config("ticker", busybox_image, "while true; do echo tick; sleep 0.2; done")
        container.linux.security_context.readonly_rootfs = True
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))
        denied = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["touch", "/new-file"], timeout=30))
        assert denied.exit_code != 0 and b"Read-only file system" in denied.stderr

        rt.UpdateContainerResources(
            cri.UpdateContainerResourcesRequest(
                container_id=cid, linux=cri.LinuxContainerResources(memory_limit_in_bytes=96 << 20)
            )
        )
        limit = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["cat", "/sys/fs/cgroup/memory.max"], timeout=30))
        assert limit.stdout == str(96 << 20).encode() + b"\n"

        # Log rotation as kubelet does it: move the file away, ask for a new one.
        log = tmp_path / "ticker" / "0.log"
        wait_for_log_line(log, "tick")
        log.rename(tmp_path / "ticker" / "0.log.1")
        rt.ReopenContainerLog(cri.ReopenContainerLogRequest(container_id=cid))
        assert ("stdout", "F", "tick") in wait_for_log_line(log, "tick")

        # An image in use cannot go; RemoveImage of an absent image is not an error.
        with pytest.raises(grpc.RpcError) as e:
            img.RemoveImage(cri.RemoveImageRequest(image=spec))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    finally:
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    img.RemoveImage(cri.RemoveImageRequest(image=spec))
    img.RemoveImage(cri.RemoveImageRequest(image=spec))
    assert img.ImageStatus(cri.ImageStatusRequest(image=spec)).image.id == ""


def test_memory_limits_apply_and_an_oom_kill_is_reported(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    rt, img = cri_server.runtime, cri_server.images
    img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    config = pod_config("hungry", tmp_path)
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    try:
        container = container_config(
            "hog", busybox_image, "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived"
        )
        container.linux.resources.memory_limit_in_bytes = 32 << 20
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid))

        def exited() -> cri.ContainerStatus | None:
            status = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
            return status if status.state == cri.CONTAINER_EXITED else None

        status = wait_until(exited, 120, "the memory hog to finish or be killed", interval=0.5)
        assert (status.reason, status.exit_code) == ("OOMKilled", 137)
    finally:
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def test_a_pod_whose_agent_is_gone_after_a_restart_is_not_ready_and_still_stops_and_goes(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    rt, img = cri_server.runtime, cri_server.images
    img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    config = pod_config("cutoff", tmp_path)
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=container_config("app", busybox_image, "sleep 600"))
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    record = json.loads((cri_server.state_dir / "sandboxes" / pod_id / "state.json").read_text())

    cri_server.stop()
    Path(record["agent_socket"]).unlink()  # QEMU keeps running; its agent can no longer be reached
    cri_server.start()
    rt = cri_server.runtime

    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert status.status.state == cri.SANDBOX_NOTREADY and status.status.metadata.name == "cutoff"
    assert "agent not reachable" in json.loads(status.info["info"])["broken_reason"]
    listed = rt.ListContainers(cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id)))
    assert [(c.id, c.state) for c in listed.containers] == [(cid, cri.CONTAINER_RUNNING)]
    with pytest.raises(grpc.RpcError) as e:
        rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=10))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]

    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert processes_mentioning(record["vm_name"]) == []
    exited = rt.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status
    assert exited.state == cri.CONTAINER_EXITED and exited.exit_code == 255
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert pod_id not in [p.id for p in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items]
    assert not (cri_server.state_dir / "sandboxes" / pod_id).exists()
    assert not (cri_server.state_dir / "cri" / f"{pod_id}.json").exists()


def test_a_pod_whose_record_cannot_be_read_after_a_restart_is_listed_and_removable(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    rt = cri_server.runtime
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("garbled", tmp_path))).pod_sandbox_id
    state_file = cri_server.state_dir / "sandboxes" / pod_id / "state.json"
    vm_name = json.loads(state_file.read_text())["vm_name"]
    netns = Path("/run/netns", json.loads(state_file.read_text())["network"]["netns"])
    assert netns.exists()

    cri_server.stop()
    state_file.write_text('{"id": "' + pod_id + '", "state": "half-written')
    cri_server.start()  # the server starts: a record it cannot read is reported, not fatal
    rt = cri_server.runtime

    listed = {p.id: p for p in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items}
    assert listed[pod_id].state == cri.SANDBOX_NOTREADY and listed[pod_id].metadata.name == "garbled"
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert status.status.state == cri.SANDBOX_NOTREADY and "unreadable_record" in status.info["info"]
    assert processes_mentioning(vm_name)
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert processes_mentioning(vm_name) == []
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert pod_id not in [p.id for p in rt.ListPodSandbox(cri.ListPodSandboxRequest()).items]
    assert not state_file.parent.exists() and not netns.exists()
    assert not (cri_server.state_dir / "cri" / f"{pod_id}.json").exists()

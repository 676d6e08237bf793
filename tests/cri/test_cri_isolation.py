"""A container's kernel-facing settings against ``kvmsandbox serve`` and a real guest: pod sysctls
and process namespaces (shared with a pause process as PID 1, per container, a target's), seccomp
profiles, read-only and propagating host mounts, privileged containers; and what a VM cannot give
(the node's namespaces) refused with INVALID_ARGUMENT before anything boots."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from tests.cri.conftest import CriServer
from tests.cri.test_cri_lifecycle import container_config, pod_config

pytestmark = pytest.mark.vm


@pytest.fixture
def pod(cri_server: CriServer, busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A pod with sysctls and the default (shared) process namespace."""
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    config = pod_config("isolation", tmp_path_factory.mktemp("isolation-logs"))
    config.linux.sysctls.update({"kernel.shm_rmid_forced": "1", "fs/mqueue/msg_max": "100"})
    config.linux.security_context.namespace_options.pid = cri.POD  # shareProcessNamespace
    rt = cri_server.runtime
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=300).pod_sandbox_id
    yield pod_id
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=300)


def run(cri_server: CriServer, pod: str, image: str, script: str = "sleep 3600", **security: object) -> str:
    """A started container; ``security`` sets fields of its security context (``pid``, ``target``
    for the namespace options)."""
    config = container_config("c", image, script)
    config.mounts.extend(security.pop("mounts", []))  # type: ignore[arg-type]
    sc = config.linux.security_context
    for key, value in security.items():
        if key == "pid":
            sc.namespace_options.pid = value  # type: ignore[assignment]
        elif key == "target":
            sc.namespace_options.target_id = value  # type: ignore[assignment]
        elif key == "seccomp":
            sc.seccomp.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(sc, key, value)
    rt = cri_server.runtime
    cid = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod, config=config), timeout=120).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
    return cid


def sh(cri_server: CriServer, cid: str, script: str) -> tuple[int, str, str]:
    r = cri_server.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=30))
    return r.exit_code, r.stdout.decode(), r.stderr.decode()


def test_pod_sysctls_and_process_namespaces(cri_server: CriServer, busybox_image: str, pod: str) -> None:
    shared = run(cri_server, pod, busybox_image, pid=cri.POD)
    own = run(cri_server, pod, busybox_image, "sleep 3601", pid=cri.CONTAINER)
    target = run(cri_server, pod, busybox_image, pid=cri.TARGET, target=own)
    # The pod's namespace: a pause process is PID 1, the guest's own processes are not there.
    _, out, _ = sh(cri_server, shared, "tr '\\0' ' ' </proc/1/cmdline; echo; cat /proc/[0-9]*/comm | sort -u")
    first, *comms = out.splitlines()
    assert "catatonit" in first and "sleep" in comms, out
    assert not {"python3", "crun", "kvmsandbox-agent"} & set(comms), out
    _, out, _ = sh(cri_server, shared, "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max")
    assert out.split() == ["1", "100"]
    # POSIX shared memory is the pod's, as SysV IPC is: one /dev/shm for every container.
    sh(cri_server, shared, "echo pod-wide > /dev/shm/note")
    assert sh(cri_server, own, "cat /dev/shm/note")[1] == "pod-wide\n"
    # Its own namespace: its command is PID 1; a target's: the target's.
    for cid in (own, target):
        assert "sleep 3601" in sh(cri_server, cid, "tr '\\0' ' ' </proc/1/cmdline")[1]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda c: setattr(c.linux.security_context.namespace_options, "pid", cri.NODE), "node's PID namespace"),
        (lambda c: setattr(c.linux.security_context.namespace_options, "ipc", cri.NODE), "node's IPC namespace"),
        (lambda c: setattr(c.linux.security_context.namespace_options, "network", cri.NODE), "node's network"),
        (
            lambda c: c.linux.security_context.namespace_options.userns_options.CopyFrom(
                cri.UserNamespace(mode=cri.POD)
            ),
            "user namespace",
        ),
        (lambda c: c.linux.sysctls.__setitem__("kernel/../../x", "1"), "not a sysctl name"),
    ],
)
def test_what_a_vm_cannot_give_is_refused_before_anything_boots(
    cri_server: CriServer,
    tmp_path: Path,
    change,
    words: str,  # type: ignore[no-untyped-def]
) -> None:
    config = pod_config("refused", tmp_path)
    change(config)
    with pytest.raises(grpc.RpcError) as e:
        cri_server.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in (e.value.details() or ""), e.value
    assert not cri_server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items


def test_a_sysctl_the_guest_kernel_lacks_fails_the_pod_and_leaves_nothing(
    cri_server: CriServer, tmp_path: Path
) -> None:
    config = pod_config("nosuchsysctl", tmp_path)
    config.linux.sysctls["kernel.no_such_key"] = "1"
    with pytest.raises(grpc.RpcError) as e:
        cri_server.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=300)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "kernel.no_such_key: the guest kernel has no such key" in (e.value.details() or "")
    assert not cri_server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items


def test_seccomp_profiles(cri_server: CriServer, busybox_image: str, pod: str, tmp_path: Path) -> None:
    block_chmod = tmp_path / "block-chmod.json"
    rule = {"names": ["chmod", "fchmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}
    block_chmod.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}))
    localhost = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref=str(block_chmod))
    default = run(cri_server, pod, busybox_image, seccomp=cri.SecurityProfile())
    unconfined = run(cri_server, pod, busybox_image)
    blocked = run(cri_server, pod, busybox_image, seccomp=localhost)
    privileged = run(cri_server, pod, busybox_image, seccomp=localhost, privileged=True)
    status = "grep Seccomp: /proc/self/status | tr -d '\\t'"
    assert sh(cri_server, default, status)[1].strip() == "Seccomp:2"
    assert sh(cri_server, unconfined, status)[1].strip() == "Seccomp:0"
    # The default profile lets root in a container chmod; the local profile does not.
    assert sh(cri_server, default, "chmod 700 /tmp")[0] == 0
    code, _, err = sh(cri_server, blocked, "chmod 700 /tmp")
    assert code != 0 and "Operation not permitted" in err
    assert sh(cri_server, privileged, "chmod 700 /tmp")[0] == 0  # a privileged container has no filter
    for ref, words in ((str(tmp_path / "missing.json"), "not found"), ("relative.json", "absolute")):
        missing = cri.SecurityProfile(profile_type=cri.SecurityProfile.Localhost, localhost_ref=ref)
        with pytest.raises(grpc.RpcError) as e:
            run(cri_server, pod, busybox_image, seccomp=missing)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in (e.value.details() or "")


@contextlib.contextmanager
def host_dir_with_a_tmpfs(tmp_path: Path, shared: bool) -> Iterator[Path]:
    """A bind of itself (shared, or private) with a tmpfs at ``tmpfs/``, and ``later/`` for a mount
    made after the container starts."""
    root = tmp_path / "vol"
    (root / "tmpfs").mkdir(parents=True)
    (root / "later").mkdir()
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "--bind", root, root], check=True)
        mounted.append(root)
        subprocess.run(["mount", "--make-rshared" if shared else "--make-rprivate", root], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", root / "tmpfs"], check=True)
        mounted.append(root / "tmpfs")
        yield root
    finally:
        for target in [root / "later", *reversed(mounted)]:
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def test_read_only_and_propagating_host_mounts(
    cri_server: CriServer, busybox_image: str, pod: str, tmp_path: Path
) -> None:
    with host_dir_with_a_tmpfs(tmp_path, shared=True) as vol:
        mounts = {
            "ro": cri.Mount(container_path="/m", host_path=str(vol), readonly=True),
            "rro": cri.Mount(container_path="/m", host_path=str(vol), readonly=True, recursive_read_only=True),
            "slave": cri.Mount(container_path="/m", host_path=str(vol), propagation=cri.PROPAGATION_HOST_TO_CONTAINER),
            "private": cri.Mount(container_path="/m", host_path=str(vol), propagation=cri.PROPAGATION_PRIVATE),
        }
        cids = {name: run(cri_server, pod, busybox_image, mounts=[m]) for name, m in mounts.items()}
        touch = "touch /m/tmpfs/f-$$ 2>/dev/null && echo sub-rw || echo sub-ro; touch /m/f-$$ 2>/dev/null || echo ro"
        assert sh(cri_server, cids["ro"], touch)[1].split() == ["sub-rw", "ro"]  # readOnly is not recursive
        assert sh(cri_server, cids["rro"], touch)[1].split() == ["sub-ro", "ro"]
        status = cri_server.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cids["slave"])).status
        assert status.mounts[0].propagation == cri.PROPAGATION_HOST_TO_CONTAINER
        rro = cri_server.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cids["rro"])).status
        assert rro.mounts[0].recursive_read_only and rro.mounts[0].readonly
        # A mount the host makes after the start reaches the rslave container only.
        (tmp_path / "flag").mkdir()
        (tmp_path / "flag" / "flagFile").touch()
        subprocess.run(["mount", "--bind", tmp_path / "flag", vol / "later"], check=True)
        assert sh(cri_server, cids["slave"], "ls -A /m/later")[1].split() == ["flagFile"]
        assert sh(cri_server, cids["private"], "ls -A /m/later")[1].split() == []
        for cid in cids.values():
            cri_server.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid), timeout=120)


def test_a_privileged_container_makes_a_bridge(cri_server: CriServer, busybox_image: str, pod: str) -> None:
    cid = run(cri_server, pod, busybox_image, privileged=True)
    code, out, err = sh(cri_server, cid, "brctl addbr kvsbtestbr && ip link show kvsbtestbr && brctl delbr kvsbtestbr")
    assert code == 0 and "kvsbtestbr" in out, (out, err)

"""Bad CRI requests get the right status code and a sentence, and leave no state behind."""

from __future__ import annotations

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from tests.cri.conftest import CriServer

pytestmark = pytest.mark.vm


def pod_config(name: str) -> cri.PodSandboxConfig:
    return cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="default"))


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    return e.value.code(), e.value.details()  # type: ignore[attr-defined]


def test_version_and_status(cri_server: CriServer) -> None:
    v = cri_server.runtime.Version(cri.VersionRequest())
    assert (v.runtime_name, v.runtime_api_version) == ("kvmsandbox", "v1")
    status = cri_server.runtime.Status(cri.StatusRequest(verbose=True))
    conditions = {c.type: c for c in status.status.conditions}
    assert conditions["RuntimeReady"].status
    assert conditions["NetworkReady"].status and "kvmsandbox-test" in conditions["NetworkReady"].message
    assert '"accel"' in status.info["config"]


def test_unknown_handler_is_invalid_argument(cri_server: CriServer) -> None:
    code, details = code_of(
        lambda: cri_server.runtime.RunPodSandbox(
            cri.RunPodSandboxRequest(config=pod_config("h"), runtime_handler="runc")
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown runtime handler 'runc'" in details
    assert not cri_server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items


def test_host_network_pods_are_refused(cri_server: CriServer) -> None:
    config = pod_config("hostnet")
    config.linux.security_context.namespace_options.network = cri.NODE
    code, details = code_of(lambda: cri_server.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "host network" in details


def test_unknown_ids_are_not_found(cri_server: CriServer) -> None:
    rt = cri_server.runtime
    for call in (
        lambda: rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id="nope")),
        lambda: rt.ContainerStatus(cri.ContainerStatusRequest(container_id="nope")),
        lambda: rt.StartContainer(cri.StartContainerRequest(container_id="nope")),
        lambda: rt.ExecSync(cri.ExecSyncRequest(container_id="nope", cmd=["true"])),
        lambda: rt.CreateContainer(
            cri.CreateContainerRequest(
                pod_sandbox_id="nope",
                config=cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image="x")),
            )
        ),
    ):
        code, details = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND, details
        assert "nope" in details
    # Stop and removal are idempotent, as the API asks: an unknown id has nothing left to reclaim.
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id="nope"))
    rt.StopContainer(cri.StopContainerRequest(container_id="nope"))
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id="nope"))
    rt.RemoveContainer(cri.RemoveContainerRequest(container_id="nope"))


def test_unimplemented_rpcs_say_so(cri_server: CriServer) -> None:
    request = cri.CheckpointContainerRequest(container_id="x", location="/tmp/x")
    code, details = code_of(lambda: cri_server.runtime.CheckpointContainer(request))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "does not implement CheckpointContainer" in details


def test_malformed_image_reference_is_invalid_argument(cri_server: CriServer) -> None:
    code, _ = code_of(
        lambda: cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image="UPPER/Case::x")))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    tags = [t for i in cri_server.images.ListImages(cri.ListImagesRequest()).images for t in i.repo_tags]
    assert not [t for t in tags if "case" in t.lower()]

"""The gRPC servicers: one thin, typed method per CRI RPC, delegating to the verb modules; every
RPC not listed here answers UNIMPLEMENTED with a sentence."""

from __future__ import annotations

import grpc

from kvmsandbox.cri import containers, images, pods, runtime_info, stats
from kvmsandbox.cri.edge import fill_unimplemented, rpc
from kvmsandbox.cri.runtime.v1 import api_pb2, api_pb2_grpc
from kvmsandbox.cri.state import CriState

Ctx = grpc.ServicerContext


class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, state: CriState) -> None:
        self.state = state

    @rpc
    def Version(self, request: api_pb2.VersionRequest, context: Ctx) -> api_pb2.VersionResponse:
        return runtime_info.version(self.state, request)

    @rpc
    def Status(self, request: api_pb2.StatusRequest, context: Ctx) -> api_pb2.StatusResponse:
        return runtime_info.status(self.state, request)

    @rpc
    def RuntimeConfig(self, request: api_pb2.RuntimeConfigRequest, context: Ctx) -> api_pb2.RuntimeConfigResponse:
        return runtime_info.runtime_config(self.state, request)

    @rpc
    def UpdateRuntimeConfig(
        self, request: api_pb2.UpdateRuntimeConfigRequest, context: Ctx
    ) -> api_pb2.UpdateRuntimeConfigResponse:
        return runtime_info.update_runtime_config(self.state, request)

    @rpc
    def RunPodSandbox(self, request: api_pb2.RunPodSandboxRequest, context: Ctx) -> api_pb2.RunPodSandboxResponse:
        return pods.run(self.state, request)

    @rpc
    def StopPodSandbox(self, request: api_pb2.StopPodSandboxRequest, context: Ctx) -> api_pb2.StopPodSandboxResponse:
        return pods.stop(self.state, request)

    @rpc
    def RemovePodSandbox(
        self, request: api_pb2.RemovePodSandboxRequest, context: Ctx
    ) -> api_pb2.RemovePodSandboxResponse:
        return pods.remove(self.state, request)

    @rpc
    def PodSandboxStatus(
        self, request: api_pb2.PodSandboxStatusRequest, context: Ctx
    ) -> api_pb2.PodSandboxStatusResponse:
        return pods.status(self.state, request)

    @rpc
    def ListPodSandbox(self, request: api_pb2.ListPodSandboxRequest, context: Ctx) -> api_pb2.ListPodSandboxResponse:
        return pods.list_(self.state, request)

    @rpc
    def CreateContainer(self, request: api_pb2.CreateContainerRequest, context: Ctx) -> api_pb2.CreateContainerResponse:
        return containers.create(self.state, request)

    @rpc
    def StartContainer(self, request: api_pb2.StartContainerRequest, context: Ctx) -> api_pb2.StartContainerResponse:
        return containers.start(self.state, request)

    @rpc
    def StopContainer(self, request: api_pb2.StopContainerRequest, context: Ctx) -> api_pb2.StopContainerResponse:
        return containers.stop(self.state, request)

    @rpc
    def RemoveContainer(self, request: api_pb2.RemoveContainerRequest, context: Ctx) -> api_pb2.RemoveContainerResponse:
        return containers.remove(self.state, request)

    @rpc
    def ListContainers(self, request: api_pb2.ListContainersRequest, context: Ctx) -> api_pb2.ListContainersResponse:
        return containers.list_(self.state, request)

    @rpc
    def ContainerStatus(self, request: api_pb2.ContainerStatusRequest, context: Ctx) -> api_pb2.ContainerStatusResponse:
        return containers.status(self.state, request)

    @rpc
    def UpdateContainerResources(
        self, request: api_pb2.UpdateContainerResourcesRequest, context: Ctx
    ) -> api_pb2.UpdateContainerResourcesResponse:
        return containers.update_resources(self.state, request)

    @rpc
    def ReopenContainerLog(
        self, request: api_pb2.ReopenContainerLogRequest, context: Ctx
    ) -> api_pb2.ReopenContainerLogResponse:
        return containers.reopen_log(self.state, request)

    @rpc
    def ExecSync(self, request: api_pb2.ExecSyncRequest, context: Ctx) -> api_pb2.ExecSyncResponse:
        return containers.exec_sync(self.state, request)

    @rpc
    def Exec(self, request: api_pb2.ExecRequest, context: Ctx) -> api_pb2.ExecResponse:
        return containers.exec_url(self.state, request)

    @rpc
    def Attach(self, request: api_pb2.AttachRequest, context: Ctx) -> api_pb2.AttachResponse:
        return containers.attach_url(self.state, request)

    @rpc
    def PortForward(self, request: api_pb2.PortForwardRequest, context: Ctx) -> api_pb2.PortForwardResponse:
        return pods.port_forward_url(self.state, request)

    @rpc
    def ContainerStats(self, request: api_pb2.ContainerStatsRequest, context: Ctx) -> api_pb2.ContainerStatsResponse:
        return stats.container_stats(self.state, request)

    @rpc
    def ListContainerStats(
        self, request: api_pb2.ListContainerStatsRequest, context: Ctx
    ) -> api_pb2.ListContainerStatsResponse:
        return stats.list_container_stats(self.state, request)

    @rpc
    def PodSandboxStats(self, request: api_pb2.PodSandboxStatsRequest, context: Ctx) -> api_pb2.PodSandboxStatsResponse:
        return stats.pod_sandbox_stats(self.state, request)

    @rpc
    def ListPodSandboxStats(
        self, request: api_pb2.ListPodSandboxStatsRequest, context: Ctx
    ) -> api_pb2.ListPodSandboxStatsResponse:
        return stats.list_pod_sandbox_stats(self.state, request)


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, state: CriState) -> None:
        self.state = state

    @rpc
    def PullImage(self, request: api_pb2.PullImageRequest, context: Ctx) -> api_pb2.PullImageResponse:
        return images.pull(self.state, request)

    @rpc
    def ImageStatus(self, request: api_pb2.ImageStatusRequest, context: Ctx) -> api_pb2.ImageStatusResponse:
        return images.status(self.state, request)

    @rpc
    def ListImages(self, request: api_pb2.ListImagesRequest, context: Ctx) -> api_pb2.ListImagesResponse:
        return images.list_(self.state, request)

    @rpc
    def RemoveImage(self, request: api_pb2.RemoveImageRequest, context: Ctx) -> api_pb2.RemoveImageResponse:
        return images.remove(self.state, request)

    @rpc
    def ImageFsInfo(self, request: api_pb2.ImageFsInfoRequest, context: Ctx) -> api_pb2.ImageFsInfoResponse:
        return images.fs_info(self.state, request)


fill_unimplemented(RuntimeService, api_pb2.DESCRIPTOR.services_by_name["RuntimeService"])
fill_unimplemented(ImageService, api_pb2.DESCRIPTOR.services_by_name["ImageService"])

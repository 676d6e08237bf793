"""The gRPC servicers: one thin method per CRI RPC, delegating to the verb modules; every RPC
not listed here answers UNIMPLEMENTED with a sentence."""

from __future__ import annotations

from typing import Any

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
    def Version(self, request: Any, context: Ctx) -> Any:
        return runtime_info.version(self.state, request)

    @rpc
    def Status(self, request: Any, context: Ctx) -> Any:
        return runtime_info.status(self.state, request)

    @rpc
    def RuntimeConfig(self, request: Any, context: Ctx) -> Any:
        return runtime_info.runtime_config(self.state, request)

    @rpc
    def UpdateRuntimeConfig(self, request: Any, context: Ctx) -> Any:
        return runtime_info.update_runtime_config(self.state, request)

    @rpc
    def RunPodSandbox(self, request: Any, context: Ctx) -> Any:
        return pods.run(self.state, request)

    @rpc
    def StopPodSandbox(self, request: Any, context: Ctx) -> Any:
        return pods.stop(self.state, request)

    @rpc
    def RemovePodSandbox(self, request: Any, context: Ctx) -> Any:
        return pods.remove(self.state, request)

    @rpc
    def PodSandboxStatus(self, request: Any, context: Ctx) -> Any:
        return pods.status(self.state, request)

    @rpc
    def ListPodSandbox(self, request: Any, context: Ctx) -> Any:
        return pods.list_(self.state, request)

    @rpc
    def CreateContainer(self, request: Any, context: Ctx) -> Any:
        return containers.create(self.state, request)

    @rpc
    def StartContainer(self, request: Any, context: Ctx) -> Any:
        return containers.start(self.state, request)

    @rpc
    def StopContainer(self, request: Any, context: Ctx) -> Any:
        return containers.stop(self.state, request)

    @rpc
    def RemoveContainer(self, request: Any, context: Ctx) -> Any:
        return containers.remove(self.state, request)

    @rpc
    def ListContainers(self, request: Any, context: Ctx) -> Any:
        return containers.list_(self.state, request)

    @rpc
    def ContainerStatus(self, request: Any, context: Ctx) -> Any:
        return containers.status(self.state, request)

    @rpc
    def UpdateContainerResources(self, request: Any, context: Ctx) -> Any:
        return containers.update_resources(self.state, request)

    @rpc
    def ReopenContainerLog(self, request: Any, context: Ctx) -> Any:
        return containers.reopen_log(self.state, request)

    @rpc
    def ExecSync(self, request: Any, context: Ctx) -> Any:
        return containers.exec_sync(self.state, request)

    @rpc
    def ContainerStats(self, request: Any, context: Ctx) -> Any:
        return stats.container_stats(self.state, request)

    @rpc
    def ListContainerStats(self, request: Any, context: Ctx) -> Any:
        return stats.list_container_stats(self.state, request)

    @rpc
    def PodSandboxStats(self, request: Any, context: Ctx) -> Any:
        return stats.pod_sandbox_stats(self.state, request)

    @rpc
    def ListPodSandboxStats(self, request: Any, context: Ctx) -> Any:
        return stats.list_pod_sandbox_stats(self.state, request)


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, state: CriState) -> None:
        self.state = state

    @rpc
    def PullImage(self, request: Any, context: Ctx) -> Any:
        return images.pull(self.state, request)

    @rpc
    def ImageStatus(self, request: Any, context: Ctx) -> Any:
        return images.status(self.state, request)

    @rpc
    def ListImages(self, request: Any, context: Ctx) -> Any:
        return images.list_(self.state, request)

    @rpc
    def RemoveImage(self, request: Any, context: Ctx) -> Any:
        return images.remove(self.state, request)

    @rpc
    def ImageFsInfo(self, request: Any, context: Ctx) -> Any:
        return images.fs_info(self.state, request)


fill_unimplemented(RuntimeService, api_pb2.DESCRIPTOR.services_by_name["RuntimeService"])
fill_unimplemented(ImageService, api_pb2.DESCRIPTOR.services_by_name["ImageService"])

"""ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats: cgroup figures from
inside the guest, the writable layer from the host."""

from __future__ import annotations

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import CriState, container_metadata, labels_match, sandbox_metadata
from kvmsandbox.errors import KvmSandboxError
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord
from kvmsandbox.sandbox.states import ContainerState, SandboxState


def _container_stats(state: CriState, sandbox: SandboxRecord, c: ContainerRecord) -> cri.ContainerStats:
    meta = state.container(c)
    attributes = cri.ContainerAttributes(
        id=c.id, metadata=container_metadata(meta), labels=meta.labels, annotations=meta.annotations
    )
    layer = state.manager.writable_layer(sandbox.id, c.id)
    out = cri.ContainerStats(
        attributes=attributes,
        writable_layer=cri.FilesystemUsage(
            fs_id=cri.FilesystemIdentifier(mountpoint=layer.mountpoint),
            used_bytes=cri.UInt64Value(value=layer.used_bytes),
            inodes_used=cri.UInt64Value(value=layer.inodes_used),
        ),
    )
    if sandbox.state is not SandboxState.READY or c.state is not ContainerState.RUNNING:
        return out
    try:
        s = state.manager.container_stats(sandbox.id, c.id)
    except KvmSandboxError:
        return out
    out.writable_layer.timestamp = s.timestamp_ns
    out.cpu.CopyFrom(
        cri.CpuUsage(timestamp=s.timestamp_ns, usage_core_nano_seconds=cri.UInt64Value(value=s.cpu_usage_ns))
    )
    available = max(0, s.memory_limit_bytes - s.memory_working_set_bytes) if s.memory_limit_bytes else 0
    out.memory.CopyFrom(
        cri.MemoryUsage(
            timestamp=s.timestamp_ns,
            working_set_bytes=cri.UInt64Value(value=s.memory_working_set_bytes),
            usage_bytes=cri.UInt64Value(value=s.memory_usage_bytes),
            rss_bytes=cri.UInt64Value(value=s.memory_rss_bytes),
            available_bytes=cri.UInt64Value(value=available),
        )
    )
    return out


def container_stats(state: CriState, req: cri.ContainerStatsRequest) -> cri.ContainerStatsResponse:
    sandbox, c = state.find_container(req.container_id)
    return cri.ContainerStatsResponse(stats=_container_stats(state, sandbox, c))


def list_container_stats(state: CriState, req: cri.ListContainerStatsRequest) -> cri.ListContainerStatsResponse:
    f = req.filter
    out = []
    for sandbox in state.manager.list_sandboxes():
        if f.pod_sandbox_id and not sandbox.id.startswith(f.pod_sandbox_id):
            continue
        for c in sandbox.containers.values():
            if (f.id and not c.id.startswith(f.id)) or not labels_match(state.container(c).labels, f.label_selector):
                continue
            out.append(_container_stats(state, sandbox, c))
    return cri.ListContainerStatsResponse(stats=out)


def _sandbox_stats(state: CriState, sandbox: SandboxRecord) -> cri.PodSandboxStats:
    """The pod's CPU and memory are its VM's on the host (containers, guest kernel, agent and VMM);
    the containers' own figures come from the guest, so the overhead is the pod's minus theirs."""
    containers = [_container_stats(state, sandbox, c) for c in sandbox.containers.values()]
    timestamp = max((c.cpu.timestamp for c in containers), default=0)
    cpu = sum(c.cpu.usage_core_nano_seconds.value for c in containers)
    working_set = sum(c.memory.working_set_bytes.value for c in containers)
    usage = sum(c.memory.usage_bytes.value for c in containers)
    if sandbox.state is SandboxState.READY:
        try:
            vm = state.manager.vm_usage(sandbox.id)
        except KvmSandboxError:
            pass
        else:
            timestamp = vm.timestamp_ns
            cpu = max(cpu, vm.cpu_usage_ns)
            working_set = max(working_set, vm.memory_working_set_bytes)
            usage = max(usage, vm.memory_usage_bytes)
    pod = state.pod(sandbox)
    return cri.PodSandboxStats(
        attributes=cri.PodSandboxAttributes(
            id=sandbox.id, metadata=sandbox_metadata(pod), labels=pod.labels, annotations=pod.annotations
        ),
        linux=cri.LinuxPodSandboxStats(
            cpu=cri.CpuUsage(timestamp=timestamp, usage_core_nano_seconds=cri.UInt64Value(value=cpu)),
            memory=cri.MemoryUsage(
                timestamp=timestamp,
                working_set_bytes=cri.UInt64Value(value=working_set),
                usage_bytes=cri.UInt64Value(value=usage),
            ),
            containers=containers,
        ),
    )


def pod_sandbox_stats(state: CriState, req: cri.PodSandboxStatsRequest) -> cri.PodSandboxStatsResponse:
    return cri.PodSandboxStatsResponse(stats=_sandbox_stats(state, state.manager.get_sandbox(req.pod_sandbox_id)))


def list_pod_sandbox_stats(state: CriState, req: cri.ListPodSandboxStatsRequest) -> cri.ListPodSandboxStatsResponse:
    f = req.filter
    out = [
        _sandbox_stats(state, s)
        for s in state.manager.list_sandboxes()
        if (not f.id or s.id.startswith(f.id)) and labels_match(state.pod(s).labels, f.label_selector)
    ]
    return cri.ListPodSandboxStatsResponse(stats=out)

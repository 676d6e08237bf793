"""ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats: cgroup figures from
inside the guest, the writable layer from the host."""

from __future__ import annotations

import time

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import CriState, container_metadata, labels_match, sandbox_metadata
from kvmsandbox.errors import KvmSandboxError
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord
from kvmsandbox.sandbox.states import ContainerState, SandboxState

UINT64_MAX = 2**64 - 1


def _attributes(state: CriState, c: ContainerRecord) -> cri.ContainerAttributes:
    meta = state.container(c)
    return cri.ContainerAttributes(
        id=c.id, metadata=container_metadata(meta), labels=meta.labels, annotations=meta.annotations
    )


def _container_stats(
    state: CriState, sandbox: SandboxRecord, c: ContainerRecord, deadline: float | None = None
) -> cri.ContainerStats:
    """The container's figures; the guest's part only while ``deadline`` (``time.monotonic()``)
    has not passed."""
    layer = state.manager.writable_layer(sandbox.id, c.id)
    out = cri.ContainerStats(
        attributes=_attributes(state, c),
        writable_layer=cri.FilesystemUsage(
            fs_id=cri.FilesystemIdentifier(mountpoint=layer.mountpoint),
            used_bytes=cri.UInt64Value(value=layer.used_bytes),
            inodes_used=cri.UInt64Value(value=layer.inodes_used),
        ),
    )
    timeout = None if deadline is None else deadline - time.monotonic()
    if sandbox.state is not SandboxState.READY or c.state is not ContainerState.RUNNING:
        return out
    if timeout is not None and timeout <= 0:
        return out
    try:
        s = state.manager.container_stats(sandbox.id, c.id, timeout)
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
    """Every guest asked at once, each within the node call timeout; a guest that does not answer
    in time gets its containers listed with their attributes only."""
    f = req.filter

    def wanted(sandbox: SandboxRecord) -> list[ContainerRecord]:
        return [
            c
            for c in sandbox.containers.values()
            if (not f.id or c.id.startswith(f.id)) and labels_match(state.container(c).labels, f.label_selector)
        ]

    listed = [s for s in state.manager.list_sandboxes() if not f.pod_sandbox_id or s.id.startswith(f.pod_sandbox_id)]
    per_pod = state.per_sandbox(
        listed,
        lambda s: [_container_stats(state, s, c, state.node_deadline()) for c in wanted(s)],
        lambda s: [cri.ContainerStats(attributes=_attributes(state, c)) for c in wanted(s)],
    )
    return cri.ListContainerStatsResponse(stats=[stats for pod in per_pod for stats in pod])


def _sandbox_stats(state: CriState, sandbox: SandboxRecord, deadline: float | None = None) -> cri.PodSandboxStats:
    """The pod's CPU and memory are its VM's on the host (containers, guest kernel, agent and VMM);
    the containers' own figures come from the guest, so the overhead is the pod's minus theirs."""
    containers = [_container_stats(state, sandbox, c, deadline) for c in sandbox.containers.values()]
    timestamp = max((c.cpu.timestamp for c in containers), default=0)
    cpu = min(UINT64_MAX, sum(c.cpu.usage_core_nano_seconds.value for c in containers))
    working_set = min(UINT64_MAX, sum(c.memory.working_set_bytes.value for c in containers))
    usage = min(UINT64_MAX, sum(c.memory.usage_bytes.value for c in containers))
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
    return cri.PodSandboxStats(
        attributes=_pod_attributes(state, sandbox),
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


def _pod_attributes(state: CriState, sandbox: SandboxRecord) -> cri.PodSandboxAttributes:
    pod = state.pod(sandbox)
    return cri.PodSandboxAttributes(
        id=sandbox.id, metadata=sandbox_metadata(pod), labels=pod.labels, annotations=pod.annotations
    )


def pod_sandbox_stats(state: CriState, req: cri.PodSandboxStatsRequest) -> cri.PodSandboxStatsResponse:
    return cri.PodSandboxStatsResponse(stats=_sandbox_stats(state, state.manager.get_sandbox(req.pod_sandbox_id)))


def list_pod_sandbox_stats(state: CriState, req: cri.ListPodSandboxStatsRequest) -> cri.ListPodSandboxStatsResponse:
    """Every guest asked at once (see ``list_container_stats``)."""
    f = req.filter
    listed = [
        s
        for s in state.manager.list_sandboxes()
        if (not f.id or s.id.startswith(f.id)) and labels_match(state.pod(s).labels, f.label_selector)
    ]
    out = state.per_sandbox(
        listed,
        lambda s: _sandbox_stats(state, s, state.node_deadline()),
        lambda s: cri.PodSandboxStats(attributes=_pod_attributes(state, s)),
    )
    return cri.ListPodSandboxStatsResponse(stats=out)

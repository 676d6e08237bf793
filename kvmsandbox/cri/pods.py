"""RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from typing import Any

from kvmsandbox.cri import validate
from kvmsandbox.cri.isolation import pod_kernel
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import (
    CriState,
    container_status,
    labels_match,
    pod_resources,
    pod_sandbox,
    sandbox_metadata,
)
from kvmsandbox.cri.store import CriPod, PodMetadata
from kvmsandbox.cri.streaming.service import PortForwardRequest
from kvmsandbox.errors import FailedPrecondition, InvalidArgument, KvmSandboxError, NotFound
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.states import SandboxState
from kvmsandbox.sandbox.types import DnsConfig, NetworkRequest, PortMapping

PROTOCOLS = {cri.TCP: "tcp", cri.UDP: "udp", cri.SCTP: "sctp"}

log = logging.getLogger(__name__)


def _handler(state: CriState, req: cri.RunPodSandboxRequest) -> str:
    """The runtime handler asked for (an empty one means the first configured).

    Raises:
        InvalidArgument: unknown handler, missing metadata.
        FailedPrecondition: the node's pod network is not ready.
    """
    handlers = state.config.runtime_handlers
    handler = req.runtime_handler or handlers[0]
    if handler not in handlers:
        raise InvalidArgument(f"unknown runtime handler {handler!r}: this node serves {', '.join(handlers)}")
    md = req.config.metadata
    if not md.name or not md.namespace or not md.uid:
        raise InvalidArgument("the pod sandbox config needs metadata with name, namespace and uid")
    net = state.manager.networking.status()
    if not net.ready:
        raise FailedPrecondition(f"the pod network is not ready: {net.message}")
    return handler


def _network_request(config: cri.PodSandboxConfig) -> NetworkRequest:
    """Port mappings with a host port (for portmap) and the CNI_ARGS kubelet-driven runtimes pass."""
    md = config.metadata
    return NetworkRequest(
        port_mappings=[
            PortMapping(
                host_port=p.host_port,
                container_port=p.container_port,
                protocol=PROTOCOLS.get(p.protocol, "tcp"),
                host_ip=p.host_ip,
            )
            for p in config.port_mappings
            if p.host_port > 0
        ],
        args={"K8S_POD_NAMESPACE": md.namespace, "K8S_POD_NAME": md.name, "K8S_POD_UID": md.uid},
    )


def run(state: CriState, req: cri.RunPodSandboxRequest) -> cri.RunPodSandboxResponse:
    """Boots the pod's VM.

    Raises:
        InvalidArgument: a field of the config is wrong (``validate.pod_config``), or see ``_handler``.
        FailedPrecondition: see ``_handler``; the manager's errors for the boot.
    """
    validate.pod_config(req.config)
    kernel = pod_kernel(req.config)
    handler = _handler(state, req)
    config = req.config
    md = config.metadata
    hostname = validate.hostname(config.hostname, md.name)
    network = _network_request(config)
    dns = config.dns_config
    linux = config.linux
    size = state.overhead.size(pod_resources(linux.resources), os.cpu_count() or 1)
    pod = CriPod(
        id=secrets.token_hex(32),
        metadata=PodMetadata(name=md.name, uid=md.uid, namespace=md.namespace, attempt=md.attempt),
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        log_directory=validate.absolute_path("log_directory", config.log_directory, required=False),
        runtime_handler=handler,
        sizing=size.reason,
        declared_overhead=pod_resources(linux.overhead),
    )
    # The CRI facts are stored first: a restart during the boot finds the pod with its metadata.
    state.store.add_pod(pod)
    try:
        record = state.manager.create_sandbox(
            pod.id,
            vcpus=size.vcpus,
            memory_mib=size.memory_mib,
            cgroup_parent=linux.cgroup_parent,
            network=network,
            hostname=hostname,
            kernel=kernel,
            dns=DnsConfig(servers=tuple(dns.servers), searches=tuple(dns.searches), options=tuple(dns.options)),
            from_template=handler in state.config.templates.handlers,
        )
    except BaseException:
        state.store.remove_pod(pod.id)
        raise
    checked = state.overhead_for(handler).check(pod.declared_overhead, record.overhead_at_boot, record.memory_mib)
    if checked is not None and checked[0].warning:
        log.warning("pod %s/%s (sandbox %s): %s", md.namespace, md.name, record.id, checked[0].warning)
    return cri.RunPodSandboxResponse(pod_sandbox_id=record.id)


def network_status(record: SandboxRecord) -> cri.PodSandboxNetworkStatus:
    """The pod IP (IPv4 first) and the others; empty once the network was released (stopped)."""
    if record.network is None or record.state is SandboxState.STOPPED:
        return cri.PodSandboxNetworkStatus(ip="")
    ips = record.network.ips
    return cri.PodSandboxNetworkStatus(ip=ips[0] if ips else "", additional_ips=[cri.PodIP(ip=ip) for ip in ips[1:]])


def overhead_info(state: CriState, record: SandboxRecord) -> dict[str, Any]:
    """The pod's overhead: declared, measured (node or at boot), the warning, and the live figures."""
    pod = state.pod(record)
    declared = pod.declared_overhead
    out: dict[str, Any] = {
        "declared": {"memory_bytes": declared.memory_limit_in_bytes, "cpu_millicores": declared.cpu_millicores},
        "at_boot_bytes": record.overhead_at_boot,
        "vmm_cgroup": record.cgroup,
        "sizing": pod.sizing,
    }
    checked = state.overhead_for(pod.runtime_handler).check(declared, record.overhead_at_boot, record.memory_mib)
    if checked is not None:
        check, source = checked
        out["measured"] = {
            "memory_bytes": check.measured_memory_bytes,
            "cpu_millicores": round(check.measured_cpu_millicores, 1),
            "source": source,
        }
        if check.warning:
            out["warning"] = check.warning
    if record.state is SandboxState.READY:
        try:
            out["now_bytes"] = state.manager.memory_snapshot(record.id)
            usage = state.manager.vm_usage(record.id)
            out["vm"] = {
                "memory_working_set_bytes": usage.memory_working_set_bytes,
                "cpu_usage_ns": usage.cpu_usage_ns,
                "source": usage.source,
            }
        except KvmSandboxError as e:
            out["now_error"] = str(e)
    return out


def stop(state: CriState, req: cri.StopPodSandboxRequest) -> cri.StopPodSandboxResponse:
    """Idempotent: a stopped sandbox stays stopped, and an unknown one has nothing left to reclaim
    (the API asks this; containerd answers the same)."""
    with contextlib.suppress(NotFound):
        state.manager.stop_sandbox(req.pod_sandbox_id)
    return cri.StopPodSandboxResponse()


def remove(state: CriState, req: cri.RemovePodSandboxRequest) -> cri.RemovePodSandboxResponse:
    """Idempotent: removing an unknown sandbox is not an error (the API asks this). A sandbox
    whose record cannot be read is destroyed by its name (its image holds stay)."""
    try:
        record = state.manager.get_sandbox(req.pod_sandbox_id)
    except NotFound:
        if req.pod_sandbox_id in state.manager.unreadable_records():
            state.manager.destroy_sandbox(req.pod_sandbox_id)
        state.store.remove_pod(req.pod_sandbox_id)
        return cri.RemovePodSandboxResponse()
    state.manager.destroy_sandbox(req.pod_sandbox_id)
    for c in record.containers.values():
        image_id = state.container(c).image_id
        if image_id:
            state.images.release(image_id, c.id)
    state.store.remove_pod(record.id)
    return cri.RemovePodSandboxResponse()


def _unreadable_pod(state: CriState, pod_id: str) -> cri.PodSandbox:
    """A sandbox whose record cannot be read: not ready, with whatever the CRI store knows."""
    pod = state.store.pod(pod_id) or CriPod(id=pod_id)
    return cri.PodSandbox(
        id=pod_id,
        metadata=sandbox_metadata(pod),
        state=cri.SANDBOX_NOTREADY,
        labels=pod.labels,
        annotations=pod.annotations,
        runtime_handler=pod.runtime_handler,
    )


def status(state: CriState, req: cri.PodSandboxStatusRequest) -> cri.PodSandboxStatusResponse:
    unreadable = state.manager.unreadable_records()
    if req.pod_sandbox_id in unreadable:
        item = _unreadable_pod(state, req.pod_sandbox_id)
        return cri.PodSandboxStatusResponse(
            status=cri.PodSandboxStatus(
                id=item.id,
                metadata=item.metadata,
                state=item.state,
                labels=item.labels,
                annotations=item.annotations,
                runtime_handler=item.runtime_handler,
            ),
            info={"info": json.dumps({"unreadable_record": unreadable[req.pod_sandbox_id]})} if req.verbose else {},
        )
    record = state.manager.refresh(req.pod_sandbox_id)
    item = pod_sandbox(record, state.pod(record))
    status = cri.PodSandboxStatus(
        id=item.id,
        metadata=item.metadata,
        state=item.state,
        created_at=item.created_at,
        network=network_status(record),
        labels=item.labels,
        annotations=item.annotations,
        runtime_handler=item.runtime_handler,
    )
    info = {}
    if req.verbose:
        info["info"] = json.dumps(
            {
                "vm": record.vm_name,
                "backend": record.backend,
                "accel": record.accel,
                "agent_transport": record.transport,
                "vcpus": record.vcpus,
                "memory_mib": record.memory_mib,
                # The VM template the VM was cloned from ("": booted cold) and its shared filesystem.
                "template": record.template,
                "warm": record.warm,
                "shared_fs": record.shared_fs,
                "console_log": str(state.manager.console_log(record.id)),
                "overhead": overhead_info(state, record),
                "network": {
                    **(record.network.to_json() if record.network else {}),
                    "requested": record.network_requested,
                    "released": record.network_released,
                },
                "broken_reason": record.broken_reason,
            }
        )
    return cri.PodSandboxStatusResponse(
        status=status,
        info=info,
        containers_statuses=[container_status(c, state.container(c)) for c in record.containers.values()],
    )


def list_(state: CriState, req: cri.ListPodSandboxRequest) -> cri.ListPodSandboxResponse:
    f = req.filter
    candidates = [pod_sandbox(record, state.pod(record)) for record in state.manager.list_sandboxes()]
    candidates += [_unreadable_pod(state, pod_id) for pod_id in sorted(state.manager.unreadable_records())]
    items = []
    for item in candidates:
        if f.id and not item.id.startswith(f.id):
            continue
        if f.HasField("state") and item.state != f.state.state:
            continue
        if not labels_match(item.labels, f.label_selector):
            continue
        items.append(item)
    return cri.ListPodSandboxResponse(items=items)


def port_forward_url(state: CriState, req: cri.PortForwardRequest) -> cri.PortForwardResponse:
    """A URL of the streaming server that forwards connections to ports in the pod (SPDY/3.1,
    ``portforward.k8s.io``); the ports come with each connection, as kubelet sends them.

    Raises:
        InvalidArgument: a port outside 1-65535. NotFound. FailedPrecondition: the pod is not
        ready, or no streaming server.
    """
    for port in req.port:
        if not 0 < port < 65536:
            raise InvalidArgument(f"invalid port {port}: must be 1-65535")
    record = state.find_sandbox_by_prefix(req.pod_sandbox_id)
    if record.state is not SandboxState.READY:
        raise FailedPrecondition(f"pod sandbox {record.id} is {record.state.value}, not ready")
    if state.streaming is None:
        raise FailedPrecondition("this runtime has no streaming server running")
    return cri.PortForwardResponse(url=state.streaming.url(PortForwardRequest(record.id)))

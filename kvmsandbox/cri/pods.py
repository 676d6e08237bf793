"""RunPodSandbox, StopPodSandbox, RemovePodSandbox, PodSandboxStatus, ListPodSandbox."""

from __future__ import annotations

import json
import secrets

from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import CriState, container_status, labels_match, pod_sandbox
from kvmsandbox.errors import InvalidArgument, NotFound


def run(state: CriState, req: cri.RunPodSandboxRequest) -> cri.RunPodSandboxResponse:
    """Boots the pod's VM. An empty handler means the first configured one.

    Raises:
        InvalidArgument: unknown handler, missing metadata, host network asked for.
    """
    handlers = state.config.runtime_handlers
    handler = req.runtime_handler or handlers[0]
    if handler not in handlers:
        raise InvalidArgument(f"unknown runtime handler {handler!r}: this node serves {', '.join(handlers)}")
    config = req.config
    md = config.metadata
    if not md.name or not md.namespace or not md.uid:
        raise InvalidArgument("the pod sandbox config needs metadata with name, namespace and uid")
    if config.linux.security_context.namespace_options.network == cri.NODE:
        raise InvalidArgument("host network pods cannot run in kvmsandbox: a VM cannot share the host's network")
    dns = config.dns_config
    record = state.manager.create_sandbox(
        secrets.token_hex(32),
        hostname=config.hostname or md.name,
        dns=pb.DNSConfig(servers=dns.servers, searches=dns.searches, options=dns.options),
        labels=dict(config.labels),
        extra={
            "metadata": {"name": md.name, "uid": md.uid, "namespace": md.namespace, "attempt": md.attempt},
            "annotations": dict(config.annotations),
            "log_directory": config.log_directory,
            "runtime_handler": handler,
        },
    )
    return cri.RunPodSandboxResponse(pod_sandbox_id=record.id)


def stop(state: CriState, req: cri.StopPodSandboxRequest) -> cri.StopPodSandboxResponse:
    """Idempotent: a stopped sandbox stays stopped."""
    state.manager.stop_sandbox(req.pod_sandbox_id)
    return cri.StopPodSandboxResponse()


def remove(state: CriState, req: cri.RemovePodSandboxRequest) -> cri.RemovePodSandboxResponse:
    """Idempotent: removing an unknown sandbox is not an error (the API asks this)."""
    try:
        record = state.manager.get_sandbox(req.pod_sandbox_id)
    except NotFound:
        return cri.RemovePodSandboxResponse()
    state.manager.destroy_sandbox(req.pod_sandbox_id)
    for c in record.containers.values():
        if c.extra.get("image_id"):
            state.images.release(c.extra["image_id"], c.id)
    return cri.RemovePodSandboxResponse()


def status(state: CriState, req: cri.PodSandboxStatusRequest) -> cri.PodSandboxStatusResponse:
    record = state.manager.refresh(req.pod_sandbox_id)
    item = pod_sandbox(record)
    status = cri.PodSandboxStatus(
        id=item.id,
        metadata=item.metadata,
        state=item.state,
        created_at=item.created_at,
        network=cri.PodSandboxNetworkStatus(ip=""),
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
                "console_log": str(state.manager.console_log(record.id)),
            }
        )
    return cri.PodSandboxStatusResponse(
        status=status,
        info=info,
        containers_statuses=[container_status(c) for c in record.containers.values()],
    )


def list_(state: CriState, req: cri.ListPodSandboxRequest) -> cri.ListPodSandboxResponse:
    f = req.filter
    items = []
    for record in state.manager.list_sandboxes():
        if f.id and not record.id.startswith(f.id):
            continue
        item = pod_sandbox(record)
        if f.HasField("state") and item.state != f.state.state:
            continue
        if not labels_match(record.labels, f.label_selector):
            continue
        items.append(item)
    return cri.ListPodSandboxResponse(items=items)

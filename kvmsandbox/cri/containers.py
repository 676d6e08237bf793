"""CreateContainer, StartContainer, StopContainer, RemoveContainer, ContainerStatus,
ListContainers, UpdateContainerResources, ReopenContainerLog, ExecSync."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path
from typing import Any

from kvmsandbox.cri import validate
from kvmsandbox.cri.isolation import container_isolation
from kvmsandbox.cri.process import process_spec
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import CONTAINER_STATES, CriState, container, container_status, labels_match
from kvmsandbox.cri.store import CriContainer, MountInfo
from kvmsandbox.cri.streaming.remotecommand import Channels
from kvmsandbox.cri.streaming.service import AttachRequest, ExecRequest
from kvmsandbox.errors import FailedPrecondition, InvalidArgument, NotFound
from kvmsandbox.image.records import ImageRecord
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.states import ContainerState, SandboxState
from kvmsandbox.sandbox.types import HostMount

# ExecSync without a timeout still ends: a stuck command must not hold a kubelet worker forever.
EXEC_SYNC_DEFAULT_TIMEOUT = 3600.0


def _host_mounts(config: cri.ContainerConfig) -> list[HostMount]:
    return [
        HostMount(
            Path(m.host_path),
            m.container_path,
            m.readonly,
            recursive_readonly=m.recursive_read_only,
            host_to_container=m.propagation != cri.PROPAGATION_PRIVATE,
        )
        for m in config.mounts
        if m.host_path
    ]


def _record(pod_id: str, config: cri.ContainerConfig, image: ImageRecord, process: ProcessSpec) -> CriContainer:
    """The CRI facts of a new container. Raises InvalidArgument: the image's StopSignal is not one."""
    stop_signal = str(image.config.get("StopSignal", ""))
    validate.stop_signal(stop_signal)
    return CriContainer(
        id=secrets.token_hex(32),
        pod_id=pod_id,
        name=config.metadata.name,
        attempt=config.metadata.attempt,
        image=config.image.image,
        image_id=image.id,
        image_ref=image.repo_digests[0] if image.repo_digests else image.id,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        mounts=tuple(
            MountInfo(m.container_path, m.host_path, m.readonly, m.recursive_read_only, m.propagation)
            for m in config.mounts
        ),
        stop_signal=stop_signal,
        uid=process.uid,
        gid=process.gid,
        supplemental_groups=tuple(process.additional_gids),
    )


def create(state: CriState, req: cri.CreateContainerRequest) -> cri.CreateContainerResponse:
    """Creates the container from a pulled image.

    Raises:
        NotFound: unknown sandbox, or the image is not pulled. FailedPrecondition: sandbox not ready,
        or lacks the PID namespace to join. InvalidArgument: missing metadata or image, a bad host
        path, seccomp profile or namespace, nothing to run.
    """
    config = req.config
    validate.container_config(config)
    sandbox = state.manager.get_sandbox(req.pod_sandbox_id)
    if sandbox.state is not SandboxState.READY:
        raise FailedPrecondition(f"sandbox {sandbox.id} is not ready ({sandbox.state.value}): cannot create containers")
    image = state.images.status(config.image.image)
    if image is None:
        raise NotFound(f"image {config.image.image!r} is not present on this node: pull it first")
    layers: list[Path] = state.images.layer_dirs(image.id)
    process = process_spec(config, image.config, layers)
    isolation = container_isolation(sandbox, config, process)
    log_path = validate.log_path(state.pod(sandbox).log_directory, config.log_path)
    meta = _record(sandbox.id, config, image, process)
    # The CRI facts are stored first: a restart during the create finds the container with them.
    if state.store.pod(sandbox.id) is None:
        state.store.add_pod(state.pod(sandbox))  # a sandbox made below the CRI, or whose file was lost
    state.store.add_container(meta)
    try:
        record = state.manager.create_container(
            sandbox.id,
            meta.id,
            lower_dirs=layers,
            process=process,
            name=config.metadata.name,
            log_path=log_path,
            readonly_rootfs=config.linux.security_context.readonly_rootfs,
            mounts=_host_mounts(config),
            resources=oci_resources(config.linux.resources),
            isolation=isolation,
        )
    except BaseException:
        state.store.remove_container(meta.id)
        raise
    state.images.hold(image.id, record.id)
    return cri.CreateContainerResponse(container_id=record.id)


def start(state: CriState, req: cri.StartContainerRequest) -> cri.StartContainerResponse:
    sandbox, _ = state.find_container(req.container_id)
    state.manager.start_container(sandbox.id, req.container_id)
    return cri.StartContainerResponse()


def stop(state: CriState, req: cri.StopContainerRequest) -> cri.StopContainerResponse:
    """The image's stop signal (SIGTERM by default), SIGKILL after ``timeout`` seconds; idempotent
    for a stopped container and for an unknown one (the API asks this)."""
    try:
        sandbox, c = state.find_container(req.container_id)
    except NotFound:
        return cri.StopContainerResponse()
    try:
        signum = validate.stop_signal(state.container(c).stop_signal)
    except InvalidArgument:
        signum = int(signal.SIGTERM)  # stored by an earlier release that did not check it
    grace = validate.timeout(req.timeout)
    state.manager.stop_container(sandbox.id, req.container_id, grace=grace, stop_signal=signum)
    return cri.StopContainerResponse()


def remove(state: CriState, req: cri.RemoveContainerRequest) -> cri.RemoveContainerResponse:
    """Idempotent: removing an unknown container is not an error (the API asks this)."""
    try:
        sandbox, c = state.find_container(req.container_id)
    except NotFound:
        return cri.RemoveContainerResponse()
    image_id = state.container(c).image_id
    state.manager.remove_container(sandbox.id, req.container_id)
    state.store.remove_container(c.id)
    if image_id:
        state.images.release(image_id, c.id)
    return cri.RemoveContainerResponse()


def status(state: CriState, req: cri.ContainerStatusRequest) -> cri.ContainerStatusResponse:
    sandbox, _ = state.find_container(req.container_id)
    record = state.manager.refresh(sandbox.id)
    c = record.containers[req.container_id]
    return cri.ContainerStatusResponse(status=container_status(c, state.container(c)))


def list_(state: CriState, req: cri.ListContainersRequest) -> cri.ListContainersResponse:
    f = req.filter
    out = []
    listed = [s for s in state.manager.list_sandboxes() if not f.pod_sandbox_id or s.id.startswith(f.pod_sandbox_id)]

    def fresh(sandbox: SandboxRecord) -> SandboxRecord:
        if any(c.state is not ContainerState.EXITED for c in sandbox.containers.values()):
            return state.manager.refresh(sandbox.id, state.node_call_timeout)
        return sandbox

    for sandbox in state.per_sandbox(listed, fresh, lambda s: s):
        for c in sandbox.containers.values():
            if f.id and not c.id.startswith(f.id):
                continue
            if f.HasField("state") and CONTAINER_STATES[c.state] != f.state.state:
                continue
            meta = state.container(c)
            if not labels_match(meta.labels, f.label_selector):
                continue
            out.append(container(c, meta))
    return cri.ListContainersResponse(containers=out)


def oci_resources(r: cri.LinuxContainerResources) -> dict[str, Any]:
    """CRI resources as an OCI ``linux.resources`` object (only what is set)."""
    cpu: dict[str, Any] = {}
    if r.cpu_shares:
        cpu["shares"] = r.cpu_shares
    if r.cpu_quota:
        cpu["quota"] = r.cpu_quota
    if r.cpu_period:
        cpu["period"] = r.cpu_period
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if r.cpuset_mems:
        cpu["mems"] = r.cpuset_mems
    out: dict[str, Any] = {}
    if cpu:
        out["cpu"] = cpu
    if r.memory_limit_in_bytes:
        out["memory"] = {"limit": r.memory_limit_in_bytes}
        if r.memory_swap_limit_in_bytes:
            out["memory"]["swap"] = r.memory_swap_limit_in_bytes
    if r.unified:
        out["unified"] = dict(r.unified)
    return out


def update_resources(state: CriState, req: cri.UpdateContainerResourcesRequest) -> cri.UpdateContainerResourcesResponse:
    validate.resources("linux", req.linux)
    sandbox, _ = state.find_container(req.container_id)
    resources = oci_resources(req.linux)
    if resources:
        state.manager.update_container_resources(sandbox.id, req.container_id, resources)
    return cri.UpdateContainerResourcesResponse()


def reopen_log(state: CriState, req: cri.ReopenContainerLogRequest) -> cri.ReopenContainerLogResponse:
    sandbox, _ = state.find_container(req.container_id)
    state.manager.reopen_log(sandbox.id, req.container_id)
    return cri.ReopenContainerLogResponse()


def exec_url(state: CriState, req: cri.ExecRequest) -> cri.ExecResponse:
    """A URL of the streaming server that runs the command once its client connects (SPDY/3.1).

    Raises:
        InvalidArgument: no command, none of stdin, stdout or stderr asked for, or a terminal
        with stderr. FailedPrecondition: the container does not run, or no streaming server.
    """
    if not req.cmd:
        raise InvalidArgument("Exec needs a command")
    validate.words("cmd", req.cmd)
    if not (req.stdin or req.stdout or req.stderr):
        raise InvalidArgument("Exec needs one of stdin, stdout or stderr")
    if req.tty and req.stderr:
        raise InvalidArgument("Exec with a terminal has one output stream: stderr must be false when tty is true")
    sandbox, c = state.find_container_by_prefix(req.container_id)
    if c.state is not ContainerState.RUNNING:
        raise FailedPrecondition(f"container {c.id} is {c.state.value}, not running")
    if state.streaming is None:
        raise FailedPrecondition("this runtime has no streaming server running")
    channels = Channels(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, tty=req.tty)
    url = state.streaming.exec_url(ExecRequest(sandbox.id, c.id, tuple(req.cmd), channels))
    return cri.ExecResponse(url=url)


def exec_sync(state: CriState, req: cri.ExecSyncRequest) -> cri.ExecSyncResponse:
    """Runs a command in a running container; ``timeout`` (seconds) is honoured.

    Raises:
        InvalidArgument: empty command. DeadlineExceeded: it ran too long (it is killed).
    """
    if not req.cmd:
        raise InvalidArgument("ExecSync needs a command")
    validate.words("cmd", req.cmd)
    sandbox, c = state.find_container_by_prefix(req.container_id)
    if c.state is not ContainerState.RUNNING:
        raise FailedPrecondition(f"container {c.id} is {c.state.value}, not running")
    timeout = validate.timeout(req.timeout) if req.timeout > 0 else EXEC_SYNC_DEFAULT_TIMEOUT
    result = state.manager.exec_sync(sandbox.id, c.id, list(req.cmd), timeout=timeout)
    return cri.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)


def attach_url(state: CriState, req: cri.AttachRequest) -> cri.AttachResponse:
    """A URL of the streaming server that attaches its client to the running container's streams:
    its output from then on, its stdin (if it was created with one) and its terminal.

    Raises:
        InvalidArgument: no stream asked for, a terminal the container does not have, or a
        terminal with stderr. FailedPrecondition: the container does not run, or no streaming server.
    """
    if not (req.stdin or req.stdout or req.stderr):
        raise InvalidArgument("Attach needs one of stdin, stdout or stderr")
    sandbox, c = state.find_container_by_prefix(req.container_id)
    if req.tty and not c.tty:
        raise InvalidArgument(f"container {c.id} has no terminal: attach without tty")
    if req.tty and req.stderr:
        raise InvalidArgument("Attach with a terminal has one output stream: stderr must be false when tty is true")
    if c.state is not ContainerState.RUNNING:
        raise FailedPrecondition(f"container {c.id} is {c.state.value}, not running")
    if state.streaming is None:
        raise FailedPrecondition("this runtime has no streaming server running")
    channels = Channels(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, tty=req.tty)
    return cri.AttachResponse(url=state.streaming.url(AttachRequest(sandbox.id, c.id, channels)))

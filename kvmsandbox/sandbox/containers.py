"""Containers in a sandbox: create (rootfs on the host, spec to the agent), start, wait, stop,
remove, log reopening and resource updates. Callers hold no lock; each function takes the
sandbox's."""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path
from typing import Any

from kvmsandbox.agent.client import ExitStatus
from kvmsandbox.agent.guest import storage as guest_storage
from kvmsandbox.errors import AgentError, DeadlineExceeded, FailedPrecondition, NotFound
from kvmsandbox.host import nsattach
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.hypervisor.disks import Disk
from kvmsandbox.sandbox import disks, oci_spec, rootfs
from kvmsandbox.sandbox.boot import GUEST_SHARE
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.lifecycle import mark_exited
from kvmsandbox.sandbox.logs import CriLogWriter
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord, check_id
from kvmsandbox.sandbox.states import ContainerState, SandboxState, move
from kvmsandbox.sandbox.stdio import MIN_POLL_INTERVAL
from kvmsandbox.sandbox.types import HostMount

# Seconds a container gets to die after SIGKILL before StopContainer gives up.
KILL_WAIT_SECONDS = 30.0
# Seconds RemoveContainer waits for the last output to reach the log.
OUTPUT_DRAIN_SECONDS = 10


def guest_rootfs_path(container_id: str) -> str:
    return f"{GUEST_SHARE}/{rootfs.rootfs_dir(container_id)}"


def find(record: SandboxRecord, container_id: str) -> ContainerRecord:
    """Raises NotFound naming the sandbox."""
    c = record.containers.get(container_id)
    if c is None:
        raise NotFound(f"container {container_id} not found in sandbox {record.id}")
    return c


def _guest_mounts(
    sdir: Path, record: SandboxRecord, container_id: str, mounts: list[HostMount], mount_ids: list[int]
) -> list[oci_spec.Mount]:
    """The pod's hostname, hosts and resolv.conf, then the host paths (bind-mounted below the
    shared dir, so the guest sees them: in the virtio-fs daemon's mount namespace, or here (each
    mount's id added to ``mount_ids``) for a share without one)."""
    out = [
        oci_spec.Mount(record.guest_files[name], f"/etc/{name}")
        for name in ("hostname", "hosts", "resolv.conf")
        if name in record.guest_files
    ]
    # Host paths go into the virtio-fs daemon's mount namespace only (not the node's) when it runs.
    daemon = virtiofsd.running_for(sdir / rootfs.SHARED) if record.shared_fs == "virtio-fs" and mounts else []
    namespace_pid = nsattach.other_namespace(daemon)
    for i, m in enumerate(mounts):
        host = rootfs.HostPath(m.host_path, m.readonly, m.recursive_readonly, m.host_to_container)
        mid = rootfs.bind_host_path(sdir, container_id, i, host, namespace_pid)
        if mid:
            mount_ids.append(mid)
        source = f"{GUEST_SHARE}/{rootfs.host_path_dir(container_id, i)}"
        # The host's mount is read-only (where asked): the guest sees the host path's mounts as one
        # file system, so its own read-only flag would reach the submounts a plain readonly spares.
        out.append(oci_spec.Mount(source, m.container_path, m.readonly and m.recursive_readonly))
    return out


class _Root:
    """What a create made of the container's rootfs so far (undone on failure)."""

    def __init__(self, layers: list[disks.Layer]) -> None:
        self.path = ""
        self.layers = layers
        self.targets: list[int] = []
        self.writable = 0
        self.baseline = 0
        self.mount_ids: list[int] = []

    def record_fields(self) -> dict[str, Any]:
        """What the container's record keeps of it."""
        return {
            "mount_ids": self.mount_ids,
            "layer_keys": [layer.key for layer in self.layers],
            "writable_target": self.writable,
            "writable_baseline_bytes": self.baseline,
        }


def _prepare_rootfs(
    ctx: SandboxContext,
    record: SandboxRecord,
    container_id: str,
    lower_dirs: list[Path],
    readonly: bool,
    root: _Root,
) -> None:
    """Block rootfs: attaches the image layers (those the pod has not attached yet) and, unless
    ``readonly``, a new writable layer. Share rootfs: mounts the host overlay. Fills ``root`` as
    it goes."""
    if ctx.config.sandbox.container_rootfs == "share" or not record.scsi_disks:
        root.layers = []  # a pod booted by an earlier release has no SCSI controller
        root.mount_ids.append(rootfs.mount_rootfs(ctx.sandbox_dir(record.id), container_id, lower_dirs))
        root.path = guest_rootfs_path(container_id)
        return
    root.targets = disks.attach_layers(ctx, record, root.layers)
    root.path = str(guest_storage.rootfs_path(container_id))
    if readonly:
        return
    (target,) = disks.free_targets(record, 1)
    path = disks.writable_path(ctx, record.id, container_id)
    root.baseline = disks.make_writable(path, ctx.config.sandbox.writable_layer_mib)
    root.writable = target
    ctx.hypervisor.attach_disk(record.vm_name, Disk(target, path, readonly=False))


def _undo(ctx: SandboxContext, record: SandboxRecord, container_id: str, root: _Root) -> None:
    """Releases what a failed create made of the container's rootfs and host paths."""
    rootfs.release_container(ctx.sandbox_dir(record.id), container_id, root.mount_ids)
    if root.layers:
        disks.remove_writable(ctx, record, container_id, root.writable)
        disks.release_layers(ctx, record)
        ctx.store.save(record)


def _record_to_create_in(ctx: SandboxContext, sandbox_id: str, container_id: str) -> SandboxRecord:
    """Raises NotFound, or FailedPrecondition: the sandbox is not ready or has the container."""
    record = ctx.store.get(sandbox_id)
    if record.state is not SandboxState.READY:
        raise FailedPrecondition(f"sandbox {sandbox_id} is {record.state.value}: cannot create containers in it")
    if container_id in record.containers or ctx.store.has_container(container_id):
        raise FailedPrecondition(f"container {container_id} exists already")
    return record


def _open_log(log_file: Path, positions: Path) -> CriLogWriter:
    try:
        return CriLogWriter(log_file, positions)
    except OSError as e:
        raise FailedPrecondition(f"the container's log {log_file} cannot be opened: {e.strerror}") from e


def _new_record(
    sandbox_id: str,
    container_id: str,
    name: str,
    process: oci_spec.ProcessSpec,
    lower_dirs: list[Path],
    log_file: Path,
    pid: int,
    root: _Root,
) -> ContainerRecord:
    return ContainerRecord(
        id=container_id,
        sandbox_id=sandbox_id,
        name=name or container_id[:12],
        state=ContainerState.CREATED,
        args=list(process.args),
        lower_dirs=[str(d) for d in lower_dirs],
        log_path=str(log_file),
        pid=pid,
        created_at_ns=time.time_ns(),
        tty=process.terminal,
        stdin=process.stdin,
        stdin_once=process.stdin_once,
        exec_base={
            "env": list(process.env),
            "cwd": process.cwd,
            "uid": process.uid,
            "gid": process.gid,
            "additional_gids": list(process.additional_gids),
            "capabilities": process.capabilities,
            "no_new_privileges": process.no_new_privileges,
        },
        **root.record_fields(),
    )


def create(
    ctx: SandboxContext,
    sandbox_id: str,
    container_id: str | None,
    *,
    lower_dirs: list[Path],
    process: oci_spec.ProcessSpec,
    name: str = "",
    log_path: Path | None = None,
    readonly_rootfs: bool = False,
    mounts: list[HostMount] | None = None,
    resources: dict[str, Any] | None = None,
    isolation: oci_spec.Isolation | None = None,
) -> ContainerRecord:
    """Prepares the rootfs on the host and creates the container in the guest (not started).
    Output goes to ``log_path`` in the CRI log format (default: the container's dir). On failure
    nothing of the container is left. Long because it is one transaction, undone as a whole."""
    container_id = check_id("container id", container_id or secrets.token_hex(32))
    # Layer images are made (once per layer, seconds for a large one) before the pod's lock.
    root = _Root(disks.layers_of(lower_dirs) if ctx.config.sandbox.container_rootfs == "block" else [])
    with ctx.lock_for(sandbox_id):
        record = _record_to_create_in(ctx, sandbox_id, container_id)
        if mounts and record.shared_fs == "none":
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is a clone of a VM template, which has no shared filesystem: "
                f"host paths (here {str(mounts[0].host_path)[:200]}) cannot be mounted into its containers; "
                "run the pod with a runtime handler that boots cold"
            )
        client = ctx.ready_client(record)
        sdir = ctx.sandbox_dir(sandbox_id)
        log_file = log_path or sdir / "logs" / f"{container_id}.log"
        writer = _open_log(log_file, positions := ctx.log_positions(sandbox_id, container_id))
        try:
            _prepare_rootfs(ctx, record, container_id, lower_dirs, readonly_rootfs, root)
            spec = oci_spec.container_spec(
                root_path=root.path,
                process=process,
                readonly_rootfs=readonly_rootfs,
                mounts=_guest_mounts(sdir, record, container_id, mounts or [], root.mount_ids),
                cgroups_path=f"/kvmsandbox/{container_id}",
                resources=resources,
                isolation=isolation,
            )
            targets = root.targets if root.layers else None
            pid = client.create_container(
                container_id,
                spec,
                layer_targets=targets,
                writable_target=root.writable,
                stdin=process.stdin and not process.terminal,
            )
        except BaseException:
            writer.close(forget_positions=True)
            _undo(ctx, record, container_id, root)
            raise
        container = _new_record(sandbox_id, container_id, name, process, lower_dirs, log_file, pid, root)
        record.containers[container_id] = container
        ctx.store.save(record)
        ctx.stdio.add_writer(key := (sandbox_id, container_id), writer)
        ctx.stdio.start_log_pump(key, log_file, positions, client)
        return container


def start(ctx: SandboxContext, sandbox_id: str, container_id: str) -> None:
    """Raises NotFound, or FailedPrecondition unless the container is created and the sandbox ready."""
    with ctx.lock_for(sandbox_id):
        record = ctx.store.get(sandbox_id)
        c = find(record, container_id)
        if c.state is not ContainerState.CREATED:
            raise FailedPrecondition(f"container {container_id} is {c.state.value}, not created")
        ctx.ready_client(record).start_container(container_id)
        move(c, ContainerState.RUNNING)
        c.started_at_ns = time.time_ns()
        ctx.store.save(record)


def wait(ctx: SandboxContext, sandbox_id: str, container_id: str, timeout: float) -> ExitStatus | None:
    """The container's exit, waiting up to ``timeout`` seconds; None while it runs."""
    client = ctx.ready_client(ctx.store.get(sandbox_id))
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        asked, wait = time.monotonic(), min(max(0.0, remaining), 30.0)
        status = client.wait_process(container_id, "", wait)
        if status is not None:
            record_exit(ctx, sandbox_id, container_id, status)
            return status
        if remaining <= 0:
            return None
        # A guest that answers "still running" at once is not asked again straight away.
        early = min(wait, MIN_POLL_INTERVAL) - (time.monotonic() - asked)
        if early > 0:
            time.sleep(early)


def record_exit(ctx: SandboxContext, sandbox_id: str, container_id: str, status: ExitStatus) -> None:
    with ctx.lock_for(sandbox_id):
        record = ctx.store.get(sandbox_id)
        c = find(record, container_id)
        if c.state is not ContainerState.EXITED:
            mark_exited(c, status, "")
            ctx.store.save(record)


def stop(
    ctx: SandboxContext, sandbox_id: str, container_id: str, grace: float, stop_signal: int = signal.SIGTERM
) -> ExitStatus:
    """``stop_signal``, then SIGKILL once ``grace`` seconds passed. Idempotent for a stopped
    container.

    Raises:
        NotFound. FailedPrecondition: the sandbox is not ready. DeadlineExceeded: it survived SIGKILL.
    """
    record = ctx.store.get(sandbox_id)
    c = find(record, container_id)
    if c.state is ContainerState.EXITED and c.exit_code is not None:
        return ExitStatus(c.exit_code, 0, c.finished_at_ns)
    client = ctx.ready_client(record)
    if grace > 0:
        client.signal_process(container_id, stop_signal)
        status = wait(ctx, sandbox_id, container_id, grace)
        if status is not None:
            return status
    client.signal_process(container_id, signal.SIGKILL)
    status = wait(ctx, sandbox_id, container_id, KILL_WAIT_SECONDS)
    if status is None:
        raise DeadlineExceeded(f"container {container_id} did not exit after SIGKILL")
    return status


def remove(ctx: SandboxContext, sandbox_id: str, container_id: str) -> None:
    """Removes the container in the guest (when the sandbox is ready) and its rootfs, layer and
    log sink on the host."""
    with ctx.lock_for(sandbox_id):
        record = ctx.store.get(sandbox_id)
        container = find(record, container_id)
        if record.state is SandboxState.READY:
            try:
                ctx.client_for(record).remove_container(container_id, force=True)
            except AgentError as e:
                if e.grpc_code != "NOT_FOUND":
                    raise
        ctx.stdio.release((sandbox_id, container_id), OUTPUT_DRAIN_SECONDS)
        ctx.log_positions(sandbox_id, container_id).unlink(missing_ok=True)
        rootfs.release_container(ctx.sandbox_dir(sandbox_id), container_id, container.mount_ids)
        if container.layer_keys:
            disks.remove_writable(ctx, record, container_id, container.writable_target)
            disks.release_layers(ctx, record, keep_container=container_id)
        del record.containers[container_id]
        ctx.store.save(record)


def wait_output(ctx: SandboxContext, sandbox_id: str, container_id: str, timeout: float) -> bool:
    """Waits until the container's stdout and stderr are closed and written to its log."""
    pump = ctx.stdio.pump((sandbox_id, container_id))
    return pump.join(timeout) if pump is not None else True


def reopen_log(ctx: SandboxContext, sandbox_id: str, container_id: str) -> None:
    """Starts a new log file at the container's log path (after kubelet rotated the old one).

    Raises:
        NotFound. FailedPrecondition: the container is not running.
    """
    c = find(ctx.store.get(sandbox_id), container_id)
    if c.state is not ContainerState.RUNNING:
        raise FailedPrecondition(
            f"container {container_id} is {c.state.value}: only a running container's log is reopened"
        )
    writer = ctx.stdio.writer((sandbox_id, container_id))
    if writer is None:
        raise FailedPrecondition(f"container {container_id} has no open log")
    writer.reopen()


def update_resources(ctx: SandboxContext, sandbox_id: str, container_id: str, resources: dict[str, Any]) -> None:
    """Applies OCI ``linux.resources`` to the container's cgroup in the guest."""
    record = ctx.store.get(sandbox_id)
    find(record, container_id)
    ctx.ready_client(record).update_container(container_id, resources)

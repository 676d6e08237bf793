"""Stopping and removing sandboxes: the VM destroyed, the pod network and the VMM's cgroup released,
the agent connection and output streams dropped, the files removed. A network or cgroup that cannot
be released yet keeps the record (stopped) and answers Unavailable, so a retry finishes the job."""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import time

from kvmsandbox.agent.client import ExitStatus
from kvmsandbox.errors import KvmSandboxError, NotFound, Unavailable
from kvmsandbox.host.cgroupfs import find_cgroups
from kvmsandbox.host.cgroups import HostCgroup
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.sandbox import rootfs
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord, check_id
from kvmsandbox.sandbox.states import ContainerState, SandboxState, move

log = logging.getLogger(__name__)

# Seconds to wait for a container to die after SIGKILL when its sandbox stops.
KILL_WAIT_SECONDS = 10
# Seconds the output pumps of a sandbox being released get to finish.
PUMP_JOIN_SECONDS = 5


def vm_name_of(sandbox_id: str) -> str:
    return f"kvmsandbox-{sandbox_id[:16]}"


def mark_exited(c: ContainerRecord, status: ExitStatus | None, reason: str) -> None:
    """Records how a container ended; without ``status`` (the VM went away first) the exit code is
    255, as containerd reports, and ``reason`` says why."""
    if c.state is not ContainerState.EXITED:
        move(c, ContainerState.EXITED)
    if status is not None:
        c.exit_code = status.exit_code
        c.finished_at_ns = status.finished_at_ns
    else:
        c.exit_code = 255 if c.exit_code is None else c.exit_code
        c.finished_at_ns = c.finished_at_ns or time.time_ns()
        c.reason = c.reason or reason


def mark_broken(ctx: SandboxContext, sandbox_id: str, reason: str) -> None:
    """A READY sandbox whose agent is unreachable or misbehaves becomes BROKEN: nothing more is
    asked of its guest, its containers keep their last known state, stop and remove still work."""
    with ctx.lock_for(sandbox_id):
        record = ctx.store.get(sandbox_id)
        if record.state is not SandboxState.READY:
            return
        move(record, SandboxState.BROKEN)
        record.broken_reason = reason
        ctx.store.save(record)
    ctx.drop_client(sandbox_id)
    log.warning("sandbox broken id=%s reason=%s", sandbox_id, reason)


def release_network(ctx: SandboxContext, record: SandboxRecord, *, remove_netns: bool, retry_later: bool) -> None:
    """CNI DEL (the namespace too with ``remove_netns``); ``record.network_released`` says whether
    it worked. Raises the KvmSandboxError of the first step that failed."""
    try:
        ctx.networking.teardown(record.id, record.network, remove_netns=remove_netns, retry_later=retry_later)
    except KvmSandboxError:
        record.network_released = False
        raise
    record.network_released = True


def release_cgroup(record: SandboxRecord) -> None:
    """Removes the VMM's cgroup and the parents made for it. Raises KvmSandboxError."""
    HostCgroup(record.cgroup).remove(record.cgroup_created)
    record.cgroup_created = []


def release_vm(
    ctx: SandboxContext,
    sandbox_id: str,
    vm_name: str,
    record: SandboxRecord | None = None,
    *,
    remove_netns: bool = False,
    retry_later: bool = True,
) -> list[str]:
    """Destroys the VM, releases its network (CNI DEL; the namespace too with ``remove_netns``),
    removes its host cgroup and drops the client, the output pumps and the log writers.

    Returns what could not be released (the caller saves ``record``, which says what is done).
    """
    problems: list[str] = []
    destroy_vm(ctx, sandbox_id, vm_name)
    if record is not None and record.network_requested and (remove_netns or not record.network_released):
        try:
            release_network(ctx, record, remove_netns=remove_netns, retry_later=retry_later)
        except KvmSandboxError as e:
            log.warning("sandbox %s: its network was not fully released: %s", sandbox_id, e)
            problems.append(f"network: {e}")
    if record is not None and record.cgroup:
        try:
            release_cgroup(record)
        except KvmSandboxError as e:
            log.warning("sandbox %s: its cgroup %s stays: %s", sandbox_id, record.cgroup, e)
            problems.append(f"cgroup {record.cgroup}: {e}")
    ctx.drop_client(sandbox_id)
    ctx.stdio.release_sandbox(sandbox_id, PUMP_JOIN_SECONDS)
    return problems


def destroy_vm(ctx: SandboxContext, sandbox_id: str, vm_name: str) -> None:
    """The VM, then the virtio-fs daemon serving its shared dir (gone by itself once QEMU is,
    unless QEMU never connected to it). Raises HypervisorError."""
    ctx.hypervisor.destroy(vm_name)
    virtiofsd.stop(ctx.sandbox_dir(sandbox_id) / rootfs.SHARED, ctx.run_dir(sandbox_id))


def release_pending(record: SandboxRecord) -> bool:
    """A stopped sandbox whose network or cgroup could not be released yet."""
    return record.network_pending_release or bool(record.cgroup and HostCgroup(record.cgroup).exists())


def remove(
    ctx: SandboxContext, sandbox_id: str, vm_name: str, record: SandboxRecord | None, *, must_release: bool = True
) -> None:
    """Releases everything and removes the sandbox's files and record.

    With ``must_release`` (RemovePodSandbox) a network or cgroup that could not be released keeps
    the record, stopped, and raises Unavailable: removing again retries, as the kubelet does.
    Without (a half-created sandbox found at start), what could not be released is logged, and
    the cached CNI state goes with the record, since nothing would retry it.
    """
    problems = release_vm(
        ctx,
        sandbox_id,
        vm_name,
        record,
        remove_netns=record is not None and record.network_requested,
        retry_later=must_release,
    )
    if problems and must_release and record is not None:
        if record.state is not SandboxState.STOPPED:
            mark_stopped(record, "sandbox removed")
        ctx.store.save(record)
        raise Unavailable(
            f"sandbox {sandbox_id} is stopped but not removed: {'; '.join(problems)}. Remove it again to retry"
        )
    if record is None and ctx.store.is_unreadable(sandbox_id):
        problems += _release_by_name(ctx, sandbox_id)
    if problems:
        ctx.networking.forget(sandbox_id)
    rootfs.remove_sandbox_dir(ctx.sandbox_dir(sandbox_id))
    shutil.rmtree(ctx.run_dir(sandbox_id), ignore_errors=True)
    ctx.boot_timings.pop(sandbox_id, None)
    ctx.store.forget(sandbox_id)
    ctx.forget_lock(sandbox_id)
    log.info("sandbox removed id=%s vm=%s", sandbox_id, vm_name)


def _release_by_name(ctx: SandboxContext, sandbox_id: str) -> list[str]:
    """For a sandbox whose record is lost: what its name alone finds (network namespace and CNI
    state, the VMM's cgroup wherever it was placed)."""
    problems = []
    try:
        ctx.networking.teardown(sandbox_id, None, remove_netns=True, retry_later=False)
    except KvmSandboxError as e:
        log.warning("sandbox %s (unreadable record): its network was not fully released: %s", sandbox_id, e)
        problems.append(f"network: {e}")
    for path in find_cgroups(f"kvmsandbox-{sandbox_id[:16]}"):
        try:
            HostCgroup(path).remove()
        except KvmSandboxError as e:
            log.warning("sandbox %s (unreadable record): its cgroup %s stays: %s", sandbox_id, path, e)
            problems.append(f"cgroup {path}: {e}")
    return problems


def mark_stopped(record: SandboxRecord, reason: str) -> None:
    """STOPPED now; containers still live are recorded as ended for ``reason``."""
    for c in record.containers.values():
        if c.state is not ContainerState.EXITED:
            mark_exited(c, None, reason)
    move(record, SandboxState.STOPPED)
    record.stopped_at_ns = time.time_ns()


def destroy(ctx: SandboxContext, sandbox_id: str) -> None:
    """Stops every container, destroys the VM and removes every host file of the sandbox.

    Idempotent: an unknown or half-created sandbox is cleaned up as far as anything of it exists.
    """
    check_id("sandbox id", sandbox_id)
    with ctx.lock_for(sandbox_id):
        try:
            record: SandboxRecord | None = ctx.store.get(sandbox_id)
        except NotFound:
            record = None
        vm_name = record.vm_name if record else vm_name_of(sandbox_id)
        if record is not None and record.state is SandboxState.READY:
            try:
                ctx.client_for(record).destroy_sandbox(timeout=10)
            except KvmSandboxError as e:
                log.warning("sandbox %s: guest teardown failed, destroying the VM anyway: %s", sandbox_id, e)
        remove(ctx, sandbox_id, vm_name, record)


def stop(ctx: SandboxContext, sandbox_id: str) -> None:
    """Kills every container, records how each ended and destroys the VM; the sandbox and its
    containers stay listed (not ready, exited) until removed. Idempotent. A BROKEN sandbox is
    stopped without asking its guest anything.

    Raises:
        NotFound: no such sandbox. Unavailable: its network or cgroup is not released yet
        (stopping again retries, as the kubelet does).
    """
    with ctx.lock_for(sandbox_id):
        if ctx.store.is_unreadable(sandbox_id):
            # Nothing is known of it but its name: its VM goes; the rest goes with the removal.
            destroy_vm(ctx, sandbox_id, vm_name_of(sandbox_id))
            return
        record = ctx.store.get(sandbox_id)
        if record.state is SandboxState.STOPPED:
            if release_pending(record):
                _finish_stop(ctx, record, release_vm(ctx, sandbox_id, record.vm_name, record))
            return
        if record.state is SandboxState.READY:
            client = ctx.client_for(record)
            for c in record.containers.values():
                if c.state is ContainerState.EXITED:
                    continue
                status = None
                with contextlib.suppress(KvmSandboxError):
                    client.signal_process(c.id, signal.SIGKILL)
                    status = client.wait_process(c.id, "", KILL_WAIT_SECONDS)
                mark_exited(c, status, "sandbox stopped")
        problems = release_vm(ctx, sandbox_id, record.vm_name, record)
        mark_stopped(record, "sandbox stopped")
        _finish_stop(ctx, record, problems)


def _finish_stop(ctx: SandboxContext, record: SandboxRecord, problems: list[str]) -> None:
    ctx.store.save(record)
    if problems:
        raise Unavailable(f"sandbox {record.id} is stopped, but {'; '.join(problems)}. Stop it again to retry")
    log.info("sandbox stopped id=%s vm=%s", record.id, record.vm_name)

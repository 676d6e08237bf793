"""After a restart of the runtime, and whenever a caller wants fresh states: container states
brought up to date from the guests; sandboxes whose VM is gone become STOPPED, those whose agent
cannot be reached BROKEN, half-created ones are removed."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from pathlib import Path

from kvmsandbox.agent.client import ExitStatus
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import KvmSandboxError, NotFound
from kvmsandbox.sandbox import lifecycle, rootfs
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.records import ID_PATTERN, SandboxRecord
from kvmsandbox.sandbox.states import ContainerState, SandboxState, move

log = logging.getLogger(__name__)

RECOVERY_WORKERS = 16
# Containers unknown to a record removed from its guest at recovery, and the time each may take.
MAX_ORPHANS = 2
ORPHAN_REMOVE_SECONDS = 5.0


def sync_containers(ctx: SandboxContext, record: SandboxRecord, timeout: float | None = None) -> set[str]:
    """Updates ``record`` (and saves it) with the containers' states in the guest; returns the
    ids the guest knows. Raises the agent's KvmSandboxError."""
    infos = {i.id: i for i in ctx.client_for(record).list_containers(timeout)}
    for c in record.containers.values():
        info = infos.get(c.id)
        if c.state is ContainerState.EXITED:
            continue
        if info is None:
            lifecycle.mark_exited(c, None, "container lost by the guest")
        elif info.state == pb.EXITED:
            lifecycle.mark_exited(c, ExitStatus(info.exit_code, 0, info.finished_at_ns), "")
            c.oom_killed = c.oom_killed or info.oom_killed
        elif info.state == pb.RUNNING and c.state is ContainerState.CREATED:
            move(c, ContainerState.RUNNING)
    ctx.store.save(record)
    return set(infos)


def refresh(ctx: SandboxContext, sandbox_id: str, timeout: float | None = None) -> SandboxRecord:
    """The sandbox record with its containers' states as the guest sees them now: the last known
    ones when the sandbox is not ready, its agent does not answer within ``timeout`` (default: the
    agent call timeout), or another call holds the sandbox that long.

    Raises:
        NotFound: no such sandbox.
    """
    lock = ctx.lock_for(sandbox_id)
    deadline = time.monotonic() + (ctx.config.agent.call_timeout_seconds if timeout is None else timeout)
    if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        return ctx.store.get(sandbox_id)
    try:
        record = ctx.store.get(sandbox_id)
        live = (c.state is not ContainerState.EXITED for c in record.containers.values())
        if record.state is SandboxState.READY and any(live):
            with contextlib.suppress(KvmSandboxError):
                sync_containers(ctx, record, max(0.05, deadline - time.monotonic()))
        return record
    finally:
        lock.release()


def recover(ctx: SandboxContext) -> None:
    """Reconnects to the agents of running sandboxes, brings container states up to date and
    resumes copying container output to the logs."""
    # What earlier removals could not delete, deleted in the background (it may be large).
    threading.Thread(target=rootfs.empty_trash, args=(ctx.store.root,), name="empty-trash", daemon=True).start()
    running = {info.name for info in ctx.hypervisor.list() if info.running}
    ids = [r.id for r in ctx.store.all()]
    if not ids:
        return
    # Sandboxes are recovered side by side: a guest that is slow to answer delays the start by
    # its own call timeout, not by the sum of everyone's.
    with concurrent.futures.ThreadPoolExecutor(min(RECOVERY_WORKERS, len(ids)), "recover") as pool:
        for sandbox_id in ids:
            pool.submit(_recover_locked, ctx, sandbox_id, running)


def _recover_locked(ctx: SandboxContext, sandbox_id: str, running: set[str]) -> None:
    with ctx.lock_for(sandbox_id):
        try:
            _recover_one(ctx, sandbox_id, running)
        except Exception:
            # One pod must never keep the runtime from starting: it is left as it is, listed
            # with its last known state, and can still be stopped and removed.
            log.exception("sandbox %s could not be recovered: left as it was", sandbox_id)


def _recover_one(ctx: SandboxContext, sandbox_id: str, running: set[str]) -> None:
    try:
        record = ctx.store.get(sandbox_id)
    except NotFound:
        return
    if record.state is SandboxState.BOOTING:
        log.warning("sandbox %s was being created when the runtime stopped: removing it", record.id)
        lifecycle.remove(ctx, record.id, record.vm_name, record, must_release=False)
    elif record.state in (SandboxState.READY, SandboxState.BROKEN) and record.vm_name not in running:
        log.warning("sandbox %s: its VM %s is gone: marking it stopped", record.id, record.vm_name)
        lifecycle.mark_stopped(record, "sandbox VM exited")
        lifecycle.release_vm(ctx, record.id, record.vm_name, record)
        ctx.store.save(record)
    elif record.state is SandboxState.READY:
        _reattach(ctx, record)


def _reattach(ctx: SandboxContext, record: SandboxRecord) -> None:
    try:
        in_guest = sync_containers(ctx, record)
    except KvmSandboxError as e:
        log.warning("sandbox %s: agent not reachable during recovery: %s", record.id, e)
        lifecycle.mark_broken(ctx, record.id, f"agent not reachable after a runtime restart: {e}")
        return
    client = ctx.client_for(record)
    _remove_orphans(ctx, record, in_guest - set(record.containers))
    for c in record.containers.values():
        if c.id in in_guest:
            try:
                positions = ctx.log_positions(record.id, c.id)
                ctx.stdio.start_log_pump((record.id, c.id), Path(c.log_path), positions, client)
            except OSError as e:
                log.warning("container %s: its log %s cannot be opened: %s", c.id, c.log_path, e)
    log.info("sandbox recovered id=%s containers=%d", record.id, len(record.containers))


def _remove_orphans(ctx: SandboxContext, record: SandboxRecord, orphans: set[str]) -> None:
    """Removes containers the guest has and the record does not: made by a CreateContainer the
    runtime did not live to record (one at most, creates hold the sandbox's lock). The list is the
    guest's word: a few are removed, each within a short timeout, and the first failure ends it."""
    for name in sorted(orphans)[:MAX_ORPHANS]:
        log.warning("sandbox %s: removing container %r, unknown to its record", record.id, name[:80])
        try:
            ctx.client_for(record).remove_container(name, force=True, timeout=ORPHAN_REMOVE_SECONDS)
        except KvmSandboxError as e:
            log.warning("sandbox %s: container %r stays in the guest: %s", record.id, name[:80], e)
            return
        if ID_PATTERN.fullmatch(name):
            # Its mounts go now; a tree the guest filled goes with the sandbox if not in time.
            rootfs.release_container(ctx.sandbox_dir(record.id), name, [], seconds=ORPHAN_REMOVE_SECONDS)

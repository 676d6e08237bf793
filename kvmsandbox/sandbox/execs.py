"""ExecSync (a command in a running container, its output collected in memory) and streaming exec
(its output passed on as it comes)."""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
import time
from typing import Any

from kvmsandbox.agent.client import AgentClient
from kvmsandbox.agent.streams import StdinWriter
from kvmsandbox.errors import DeadlineExceeded, KvmSandboxError
from kvmsandbox.sandbox import oci_spec
from kvmsandbox.sandbox.containers import find
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.interactive import ProcessIO, first_size, join_copiers, start_copiers
from kvmsandbox.sandbox.records import ContainerRecord
from kvmsandbox.sandbox.stdio import OutputCollector, OutputPump
from kvmsandbox.sandbox.types import ExecResult

# Seconds a killed command gets to be reaped after a timeout: ExecSync answers within about this
# much of its deadline, whatever the command or the guest does.
KILL_WAIT_SECONDS = 1
# Seconds the output of a finished command gets to arrive; then the pumps are stopped.
OUTPUT_DRAIN_SECONDS = 10
# How long one wait for a streaming command lasts before the client is checked on.
STREAM_WAIT_SECONDS = 1.0
# A terminal's first size, if the client sends it this soon, is the one the command starts with.
FIRST_SIZE_WAIT_SECONDS = 0.5
# A copier is at most one agent call behind the end of its command.
COPIER_JOIN_SECONDS = 10.0


def exec_sync(ctx: SandboxContext, sandbox_id: str, container_id: str, args: list[str], timeout: float) -> ExecResult:
    """Runs ``args`` in a running container and returns its exit code and output (each stream cut
    to ``EXEC_OUTPUT_LIMIT`` bytes). Its output pumps never outlive the call by more than one poll.

    Raises:
        NotFound. FailedPrecondition: the sandbox is not ready.
        DeadlineExceeded: it ran longer than ``timeout`` seconds (it is killed).
    """
    record = ctx.store.get(sandbox_id)
    base = exec_base(find(record, container_id))
    client = ctx.ready_client(record)
    exec_id = secrets.token_hex(8)
    deadline = time.monotonic() + timeout
    process = oci_spec.process_object(oci_spec.ProcessSpec(args=args, **base))
    client.exec_process(container_id, exec_id, process, timeout=max(1.0, timeout))
    collector = OutputCollector()
    pump = OutputPump(client, container_id, exec_id, collector, ctx.stdio.bytes_per_second)
    try:
        status = client.wait_process(container_id, exec_id, max(0.0, deadline - time.monotonic()))
        if status is None:
            with contextlib.suppress(KvmSandboxError):
                client.signal_process(container_id, signal.SIGKILL, exec_id, timeout=KILL_WAIT_SECONDS)
                client.wait_process(container_id, exec_id, KILL_WAIT_SECONDS)
            raise DeadlineExceeded(f"command {args[0]!r} in container {container_id} ran longer than {timeout}s")
        pump.join(OUTPUT_DRAIN_SECONDS)
    finally:
        pump.stop()
    return ExecResult(status.exit_code, bytes(collector.data["stdout"]), bytes(collector.data["stderr"]))


def exec_streaming(ctx: SandboxContext, sandbox_id: str, container_id: str, args: list[str], io: ProcessIO) -> int:
    """Runs ``args`` in a running container with its output pumped to ``io.sink`` as it comes,
    and the client's stdin and terminal sizes copied in, until it exits; returns its exit code.
    When ``io.cancelled`` is set (the client went away) the command is killed.

    Raises:
        NotFound. FailedPrecondition: the sandbox is not ready. KvmSandboxError: the agent failed.
    """
    record = ctx.store.get(sandbox_id)
    base = exec_base(find(record, container_id))
    return _stream(ctx.ready_client(record), ctx, container_id, args, io, base)


def guest_shell(ctx: SandboxContext, sandbox_id: str, args: list[str], io: ProcessIO) -> int:
    """As ``exec_streaming``, for a command in the pod's guest itself, outside every container
    (the debug console). Raises NotFound, FailedPrecondition, KvmSandboxError."""
    return _stream(ctx.ready_client(ctx.store.get(sandbox_id)), ctx, "", args, io, {})


def exec_base(c: ContainerRecord) -> dict[str, Any]:
    """The container's user, groups, environment, directory and privileges, for an exec in it
    (none for a container recorded by a release that did not keep them: root in /, defaults)."""
    base = c.exec_base
    out: dict[str, Any] = {}
    if isinstance(base.get("env"), list):
        out["env"] = [e for e in base["env"] if isinstance(e, str)]
    if isinstance(base.get("cwd"), str):
        out["cwd"] = base["cwd"]
    for key in ("uid", "gid"):
        if isinstance(base.get(key), int):
            out[key] = base[key]
    if isinstance(base.get("additional_gids"), list):
        out["additional_gids"] = [g for g in base["additional_gids"] if isinstance(g, int)]
    if isinstance(base.get("capabilities"), list):
        out["capabilities"] = [c for c in base["capabilities"] if isinstance(c, str)]
    if isinstance(base.get("no_new_privileges"), bool):
        out["no_new_privileges"] = base["no_new_privileges"]
    return out


def _stream(
    client: AgentClient, ctx: SandboxContext, container_id: str, args: list[str], io: ProcessIO, base: dict[str, Any]
) -> int:
    exec_id = secrets.token_hex(8)
    size = first_size(io, FIRST_SIZE_WAIT_SECONDS)
    process = oci_spec.process_object(oci_spec.ProcessSpec(args=args, terminal=io.tty, console_size=size, **base))
    client.exec_process(container_id, exec_id, process, stdin=io.stdin is not None and not io.tty)
    pump = OutputPump(client, container_id, exec_id, io.sink, ctx.stdio.bytes_per_second)
    ended = threading.Event()
    start_copiers(io, StdinWriter(client, container_id, exec_id), ended, f"exec-{exec_id}")
    done = False
    try:
        while True:
            status = client.wait_process(container_id, exec_id, STREAM_WAIT_SECONDS)
            if status is not None:
                done = True
                pump.join(OUTPUT_DRAIN_SECONDS)
                return status.exit_code
            if io.cancelled.is_set():
                return -1
    finally:
        ended.set()
        pump.stop()
        if not done:
            # Cancelled, or the agent failed under us: nobody reads its output any more.
            with contextlib.suppress(KvmSandboxError):
                client.signal_process(container_id, signal.SIGKILL, exec_id, timeout=KILL_WAIT_SECONDS)
                client.wait_process(container_id, exec_id, KILL_WAIT_SECONDS)
        join_copiers(io, COPIER_JOIN_SECONDS)

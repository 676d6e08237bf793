"""``kvmsandbox serve``: the CRI server on a unix socket.

SIGTERM or SIGINT stops serving and leaves every pod running; the next server recovers them."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import IO

# libvirt forks helper processes and QEMU from its own threads; gRPC's fork handlers then run in
# those children and crash them (SIGSEGV/SIGABRT before exec). The server never forks Python.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import paramiko

from kvmsandbox.config import Config
from kvmsandbox.console.server import ConsoleServer
from kvmsandbox.cri.migrate import migrate_schema_0
from kvmsandbox.cri.runtime.v1 import api_pb2_grpc
from kvmsandbox.cri.service import ImageService, RuntimeService
from kvmsandbox.cri.state import CriState
from kvmsandbox.cri.store import CriStore
from kvmsandbox.cri.streaming.service import Streaming
from kvmsandbox.errors import FailedPrecondition
from kvmsandbox.image import ImageStore
from kvmsandbox.runtime import open_manager
from kvmsandbox.sandbox.console import SWEEP_SECONDS as CONSOLE_SWEEP_SECONDS
from kvmsandbox.sandbox.manager import SandboxManager

log = logging.getLogger(__name__)

# Pod starts take seconds under TCG: enough workers that one slow RunPodSandbox blocks nothing else.
WORKERS = 32
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Large requests (up to MAX_MESSAGE_BYTES each, on up to WORKERS threads) leave freed memory in
# the allocator's arenas; it is handed back to the system this often.
TRIM_SECONDS = 10.0


def _housekeeping(stop: threading.Event, manager: SandboxManager) -> None:
    """The server's periodic work, on one thread: every console log is bounded each
    CONSOLE_SWEEP_SECONDS, and memory the allocator keeps after large requests is handed back to
    the system each TRIM_SECONDS (glibc only)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        malloc_trim = None
    last_trim = time.monotonic()
    while not stop.wait(CONSOLE_SWEEP_SECONDS):
        try:
            manager.trim_consoles()
        except Exception:  # the thread outlives any one sweep's surprise
            log.exception("the console log sweep failed")
        if malloc_trim is not None and time.monotonic() - last_trim >= TRIM_SECONDS:
            malloc_trim(0)
            last_trim = time.monotonic()


def _lock_state_dir(state_dir: Path) -> IO[str]:
    """One server per state dir: two would fight over the same VMs and records.

    Raises:
        FailedPrecondition: another server holds the lock.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    f = open(state_dir / "serve.lock", "w")  # noqa: SIM115 - held for the life of the server
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise FailedPrecondition(f"another kvmsandbox server uses {state_dir}") from None
    f.write(str(os.getpid()))
    f.flush()
    return f


def _settle_holds(state: CriState, manager: SandboxManager, store: CriStore) -> None:
    """Images stay held, and CRI facts kept, only for pods and containers that still exist; while
    a sandbox record cannot be read, nobody knows its containers: every hold stays."""
    records = manager.list_sandboxes()
    unreadable = manager.unreadable_records()
    containers = {c for record in records for c in record.containers}
    if unreadable:
        log.error("sandbox records that cannot be read (listed not ready until removed): %s", unreadable)
    else:
        state.images.release_all_but(containers)
    store.retain({r.id for r in records}, containers, unknown_pods=set(unreadable))


def _start_fronts(config: Config, state: CriState, manager: SandboxManager) -> ConsoleServer | None:
    """Starts the streaming server and the debug console (a console that cannot start is logged,
    not fatal: the CRI matters more)."""
    assert state.streaming is not None
    state.streaming.start()
    try:
        console = ConsoleServer(config, lambda user: state.find_sandbox_by_prefix(user).id, manager.guest_shell)
    except (OSError, ValueError, paramiko.SSHException) as e:
        log.error("the debug console cannot start: its host key: %s", e)
        return None
    try:
        console.start()
    except OSError as e:
        log.error("the debug console cannot listen: %s", e)
        console.stop()
        return None
    return console


def serve(config: Config, ready: threading.Event | None = None, stop: threading.Event | None = None) -> int:
    """Serves until SIGTERM/SIGINT (or ``stop``); returns the exit code."""
    lock = _lock_state_dir(config.state_dir)
    store = CriStore(config.state_dir)
    manager = open_manager(config)
    # Before recovery may rewrite the records the previous release wrote.
    migrate_schema_0(manager.schema0_cri_facts(), store)
    manager.recover()
    state = CriState(
        config=config,
        manager=manager,
        images=ImageStore(config.image_dir, config.registry, layer_images=config.sandbox.container_rootfs == "block"),
        store=store,
        streaming=Streaming(config.streaming, manager),
    )
    _settle_holds(state, manager, store)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cri"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    api_pb2_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(state), server)  # type: ignore[abstract]
    api_pb2_grpc.add_ImageServiceServicer_to_server(ImageService(state), server)  # type: ignore[abstract]
    config.socket.parent.mkdir(parents=True, exist_ok=True)
    config.socket.unlink(missing_ok=True)
    server.add_insecure_port(f"unix://{config.socket}")
    console = _start_fronts(config, state, manager)
    server.start()
    manager.start_warm_pool()  # last: a failed start leaves no waiting VM behind
    stop = stop or threading.Event()
    threading.Thread(target=_housekeeping, args=(stop, manager), name="housekeeping", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.warning(
        "serving CRI on unix://%s (accel %s, agent transport %s)", config.socket, manager.accel, manager.transport
    )
    print(f"kvmsandbox: serving CRI on unix://{config.socket}", flush=True)
    if ready is not None:
        ready.set()
    stop.wait()
    log.warning("stopping: pods keep running")
    server.stop(grace=5).wait()
    assert state.streaming is not None
    state.streaming.stop()
    if console is not None:
        console.stop()
    state.close()
    manager.close()
    manager.hypervisor.close()
    config.socket.unlink(missing_ok=True)
    lock.close()
    return 0

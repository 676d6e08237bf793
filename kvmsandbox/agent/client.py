"""The host's client of the in-guest agent: one connection, many requests in flight, a deadline
on every call."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from kvmsandbox.agent import wire
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import AgentError, AgentMisbehaved, DeadlineExceeded, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Connector = Callable[[float], socket.socket]
# Slack on top of a long-poll's own wait, for the round trip through a slow (TCG) guest.
LONG_POLL_SLACK = 15.0
# Answers to ids this connection never sent are dropped (a virtio-serial port replays the answers
# of long polls meant for an earlier connection or runtime: two per running container), up to
# this many; beyond, the agent misbehaves. Late answers to calls that timed out are expected, not
# stray: the last ids given up are kept, each accepted once.
MAX_STRAY_ANSWERS = 4096
# ... and up to this many bytes of them (a replayed answer holds at most 1 MiB of output).
MAX_STRAY_BYTES = 256 * 1024 * 1024
FORGOTTEN_IDS_KEPT = 4096
# The reader wakes this often to notice a closed connection; writes wait at most the call's deadline.
SOCKET_POLL_SECONDS = 1.0
# More containers than this in one guest's list is a lie (each one is a process tree in the VM).
MAX_LISTED_CONTAINERS = 10_000
# An agent's error message is cut to this length before it reaches a log or a CRI status.
MAX_MESSAGE_CHARS = 1024


def serial_connector(socket_path: Path) -> Connector:
    """Connects to the unix socket behind the VM's virtio-serial agent port."""

    def connect(timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    return connect


def vsock_connector(cid: int, port: int = wire.AGENT_VSOCK_PORT) -> Connector:
    """Connects to the agent over AF_VSOCK."""

    def connect(timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((cid, port))
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    return connect


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    signal: int
    finished_at_ns: int


class _Connection:
    """One open stream to the agent with a reader thread that completes pending calls.

    What the agent sends is untrusted: the first frame that is not a well-formed answer ends the
    connection for good, and ``on_violation`` is told why (after pending calls have failed)."""

    def __init__(self, sock: socket.socket, name: str, on_violation: Callable[[str], None]) -> None:
        # Never blocking for good: a guest that stops reading cannot hold a writer past its deadline.
        sock.settimeout(SOCKET_POLL_SECONDS)
        self.sock = sock
        self.name = name
        self.pending: dict[int, Future[pb.Response]] = {}
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.closed = False
        self._on_violation = on_violation
        self._forgotten: set[int] = set()
        self._forgotten_order: deque[int] = deque()
        threading.Thread(target=self._read_loop, name=f"agent-{name}", daemon=True).start()

    def _read_loop(self) -> None:
        decoder = wire.FrameDecoder(strict=True)
        stray = stray_bytes = 0
        try:
            while not self.closed:
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                for frame in decoder.feed(data):
                    if frame.WhichOneof("kind") != "response":
                        raise wire.FrameError("a frame that is not an answer")
                    with self.lock:
                        fut = self.pending.pop(frame.response.id, None)
                        late = fut is None and frame.response.id in self._forgotten
                        self._forgotten.discard(frame.response.id)  # a late answer is taken once
                    if fut is not None:
                        if not fut.done():
                            fut.set_result(frame.response)
                    elif not late:
                        stray += 1
                        stray_bytes += frame.ByteSize()
                        if stray > MAX_STRAY_ANSWERS or stray_bytes > MAX_STRAY_BYTES:
                            raise wire.FrameError(f"{stray} answers ({stray_bytes} bytes) to requests never sent")
        except OSError:
            pass
        except wire.FrameError as e:
            self.violation(f"the agent of {self.name} broke the protocol: {e}")
            return
        self.close(f"connection to the agent of {self.name} closed")

    def violation(self, reason: str) -> None:
        """Ends the connection because the agent misbehaved, then reports it."""
        self.close(reason, AgentMisbehaved)
        self._on_violation(reason)

    def send(self, request: pb.Request, deadline: float) -> Future[pb.Response]:
        """Writes the request before ``deadline`` (a ``time.monotonic()`` value).

        Raises:
            InvalidArgument: the request is larger than a frame may be.
            DeadlineExceeded: the agent did not take it in time (the connection is closed: a frame
                written in part has spoiled the stream).
            Unavailable: the connection is closed.
        """
        try:
            data = wire.encode(pb.Frame(request=request))
        except wire.FrameError as e:
            raise InvalidArgument(f"{request.method} for the agent of {self.name} is too large: {e}") from None
        fut: Future[pb.Response] = Future()
        with self.lock:
            if self.closed:
                raise Unavailable(f"connection to the agent of {self.name} is closed")
            self.pending[request.id] = fut
        if not self.write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.forget(request.id)
            raise DeadlineExceeded(f"the agent of {self.name} is not taking requests ({request.method})")
        try:
            view = memoryview(data)
            while view:
                if time.monotonic() > deadline:
                    self.close(f"the agent of {self.name} stopped reading its requests")
                    raise DeadlineExceeded(f"the agent of {self.name} did not take {request.method} in time")
                try:
                    view = view[self.sock.send(view) :]
                except TimeoutError:
                    continue
        except OSError as e:
            self.close(f"writing to the agent of {self.name} failed: {e}")
        finally:
            self.write_lock.release()
        return fut

    def forget(self, request_id: int) -> None:
        """Gives up on a call (it timed out); its answer, if it ever comes, is dropped quietly."""
        with self.lock:
            self.pending.pop(request_id, None)
            self._forgotten.add(request_id)
            self._forgotten_order.append(request_id)
            if len(self._forgotten_order) > FORGOTTEN_IDS_KEPT:
                self._forgotten.discard(self._forgotten_order.popleft())

    def close(self, reason: str, error: type[Unavailable] = Unavailable) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            pending = list(self.pending.values())
            self.pending.clear()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for fut in pending:
            if not fut.done():
                fut.set_exception(error(reason))


class AgentClient:
    """Calls the agent of one sandbox. Thread-safe; reconnects on the next call after a failure.

    Every method raises:
        DeadlineExceeded: no answer within the call's deadline.
        Unavailable: the agent cannot be reached (VM gone, connection refused or dropped).
        AgentError: the agent answered with an error (its code and message are kept).
    """

    def __init__(
        self,
        connector: Connector,
        name: str,
        *,
        default_timeout: float = 30.0,
        on_violation: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._connector = connector
        self.name = name
        self.default_timeout = default_timeout
        self._conn: _Connection | None = None
        self._conn_lock = threading.Lock()
        # A random start keeps ids of this client apart from stale answers of an earlier one.
        self._ids = itertools.count(random.getrandbits(48))
        self._on_violation = on_violation
        # Why the agent is no longer trusted; from then on every call fails at once.
        self.violation: str | None = None

    def _violated(self, reason: str) -> None:
        if self.violation is None:
            self.violation = reason
            log.warning("%s", reason)
            self._on_violation(reason)

    def _connection(self, timeout: float) -> _Connection:
        with self._conn_lock:
            if self.violation is not None:
                raise AgentMisbehaved(self.violation)
            if self._conn is None or self._conn.closed:
                try:
                    sock = self._connector(timeout)
                    self._conn = _Connection(sock, self.name, self._violated)
                except OSError as e:
                    raise Unavailable(f"cannot connect to the agent of {self.name}: {e}") from None
            return self._conn

    def close(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close(f"client of {self.name} closed")
                self._conn = None

    def call(self, method: str, request: Message, response_type: type[M], timeout: float | None = None) -> M:
        """Sends one request and returns the decoded answer (see the class docstring for errors)."""
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        conn = self._connection(timeout)
        req = pb.Request(id=next(self._ids), method=method, body=request.SerializeToString())
        fut = conn.send(req, deadline)
        try:
            response = fut.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            conn.forget(req.id)
            raise DeadlineExceeded(f"agent of {self.name} did not answer {method} within {timeout:.1f}s") from None
        try:
            if response.status.code != pb.OK:
                code = pb.Code.Name(response.status.code)
                raise AgentError(f"{method}: {response.status.message[:MAX_MESSAGE_CHARS]}", code)
            return response_type.FromString(response.body)
        except (ValueError, DecodeError) as e:
            reason = f"the agent of {self.name} broke the protocol: its answer to {method} does not decode ({e})"
            conn.violation(reason)
            raise AgentMisbehaved(reason) from None

    def wait_ready(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> pb.HealthResponse:
        """Waits until the agent answers Health, pinging on one connection while the guest boots.

        Raises:
            DeadlineExceeded: not ready within ``timeout``. Unavailable: ``alive()`` turned false.
            AgentMisbehaved: the agent broke the protocol.
        """
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if not alive():
                raise Unavailable(f"the VM of {self.name} stopped before its agent answered")
            try:
                return self.call("Health", pb.HealthRequest(), pb.HealthResponse, timeout=0.5)
            except AgentMisbehaved:
                raise
            except (DeadlineExceeded, Unavailable) as e:
                last_error = str(e)
                if isinstance(e, Unavailable):
                    time.sleep(0.1)
        raise DeadlineExceeded(f"agent of {self.name} not ready after {timeout:.0f}s (last: {last_error})")

    # Typed conveniences, one per RPC the runtime uses.

    def guest_details(self) -> pb.GuestDetailsResponse:
        return self.call("GuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)

    def create_sandbox(self, request: pb.CreateSandboxRequest) -> pb.CreateSandboxResponse:
        return self.call("CreateSandbox", request, pb.CreateSandboxResponse)

    def destroy_sandbox(self, timeout: float | None = None) -> None:
        self.call("DestroySandbox", pb.DestroySandboxRequest(), pb.DestroySandboxResponse, timeout)

    def create_container(
        self,
        container_id: str,
        spec: dict[str, Any],
        timeout: float | None = None,
        *,
        layer_targets: list[int] | None = None,
        writable_target: int = 0,
        stdin: bool = False,
    ) -> int:
        """Creates the container; with ``layer_targets`` (disks, top first) and ``writable_target``
        (0: none) the agent assembles its rootfs from disks at the spec's root path."""
        req = pb.CreateContainerRequest(container_id=container_id, oci_spec_json=json.dumps(spec), stdin=stdin)
        if layer_targets is not None:
            req.rootfs.layer_targets.extend(layer_targets)
            req.rootfs.writable_target = writable_target
        return self.call("CreateContainer", req, pb.CreateContainerResponse, timeout).pid

    def start_container(self, container_id: str, timeout: float | None = None) -> None:
        req = pb.StartContainerRequest(container_id=container_id)
        self.call("StartContainer", req, pb.StartContainerResponse, timeout)

    def exec_process(
        self,
        container_id: str,
        exec_id: str,
        process: dict[str, Any],
        timeout: float | None = None,
        stdin: bool = False,
    ) -> int:
        req = pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process_json=json.dumps(process), stdin=stdin
        )
        return self.call("ExecProcess", req, pb.ExecProcessResponse, timeout).pid

    def wait_process(self, container_id: str, exec_id: str = "", timeout: float = 0.0) -> ExitStatus | None:
        """The exit of a process, waiting up to ``timeout`` seconds in the guest; None if it still runs."""
        req = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id, timeout_ms=int(timeout * 1000))
        resp = self.call("WaitProcess", req, pb.WaitProcessResponse, timeout + LONG_POLL_SLACK)
        if not resp.exited:
            return None
        return ExitStatus(resp.exit_code, resp.signal, resp.finished_at_ns)

    def signal_process(self, container_id: str, signal: int, exec_id: str = "", timeout: float | None = None) -> None:
        req = pb.SignalProcessRequest(container_id=container_id, exec_id=exec_id, signal=signal)
        self.call("SignalProcess", req, pb.SignalProcessResponse, timeout)

    def read_stdio(
        self,
        container_id: str,
        exec_id: str,
        stream: pb.Stream.ValueType,
        wait: float,
        at: tuple[int, int] = (0, 0),
        max_bytes: int = 0,
    ) -> pb.ReadStdioResponse:
        """Output from position ``at[0]``, forgetting what is before ``at[1]`` (stored by the host).
        The answer's ``offset`` is the guest's word: callers check it against what they asked."""
        offset, acknowledged = at
        req = pb.ReadStdioRequest(
            container_id=container_id,
            exec_id=exec_id,
            stream=stream,
            max_bytes=max_bytes,
            wait_ms=int(wait * 1000),
            offset=offset,
            acknowledged=acknowledged,
        )
        return self.call("ReadStdio", req, pb.ReadStdioResponse, wait + LONG_POLL_SLACK)

    def remove_container(self, container_id: str, force: bool = False, timeout: float | None = None) -> None:
        req = pb.RemoveContainerRequest(container_id=container_id, force=force)
        self.call("RemoveContainer", req, pb.RemoveContainerResponse, timeout)

    def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        req = pb.UpdateContainerRequest(container_id=container_id, resources_json=json.dumps(resources))
        self.call("UpdateContainer", req, pb.UpdateContainerResponse)

    def container_stats(self, container_id: str, timeout: float | None = None) -> pb.ContainerStatsResponse:
        req = pb.ContainerStatsRequest(container_id=container_id)
        return self.call("ContainerStats", req, pb.ContainerStatsResponse, timeout)

    def list_containers(self, timeout: float | None = None) -> list[pb.ContainerInfo]:
        """Raises AgentMisbehaved for an answer listing more containers than a guest can hold."""
        resp = self.call("ListContainers", pb.ListContainersRequest(), pb.ListContainersResponse, timeout)
        if len(resp.containers) > MAX_LISTED_CONTAINERS:
            reason = f"the agent of {self.name} listed {len(resp.containers)} containers"
            self._violated(reason)
            self.close()
            raise AgentMisbehaved(reason)
        return list(resp.containers)

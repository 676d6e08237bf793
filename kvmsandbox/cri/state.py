"""What the CRI verbs share: the sandbox manager, the CRI store, the image store, the config, and
the translation of the runtime's records into CRI messages."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import TypeVar

from kvmsandbox.config import Config
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.store import CriContainer, CriPod, CriStore
from kvmsandbox.cri.streaming.service import Streaming
from kvmsandbox.errors import NotFound
from kvmsandbox.image import ImageStore
from kvmsandbox.overhead.node import NodeOverhead
from kvmsandbox.overhead.sizing import PodResources
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord
from kvmsandbox.sandbox.states import ContainerState, SandboxState

log = logging.getLogger(__name__)

T = TypeVar("T")
# Guests asked at once by a node-wide call; more wait their turn (within the same deadline).
FANOUT_WORKERS = 16

SANDBOX_STATES = {
    SandboxState.READY: cri.SANDBOX_READY,
    SandboxState.BOOTING: cri.SANDBOX_NOTREADY,
    SandboxState.BROKEN: cri.SANDBOX_NOTREADY,
    SandboxState.STOPPED: cri.SANDBOX_NOTREADY,
}
CONTAINER_STATES = {
    ContainerState.CREATED: cri.CONTAINER_CREATED,
    ContainerState.RUNNING: cri.CONTAINER_RUNNING,
    ContainerState.EXITED: cri.CONTAINER_EXITED,
}


@dataclass
class CriState:
    config: Config
    manager: SandboxManager
    images: ImageStore
    store: CriStore
    pod_cidr: str = ""
    streaming: Streaming | None = None
    overhead: NodeOverhead = field(init=False)
    _handler_overhead: dict[str, NodeOverhead] = field(init=False)
    fanout: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.overhead = NodeOverhead(self.config)
        # A template handler's pods are checked against their own measurement (overhead-H.json).
        self._handler_overhead = {
            h: NodeOverhead(self.config, self.config.measurement_file_for(h)) for h in self.config.templates.handlers
        }
        self.fanout = ThreadPoolExecutor(max_workers=FANOUT_WORKERS, thread_name_prefix="guest-fanout")
        self._asking: set[str] = set()
        self._asking_lock = threading.Lock()

    def overhead_for(self, handler: str) -> NodeOverhead:
        """The measurement pods of ``handler`` are checked against."""
        return self._handler_overhead.get(handler, self.overhead)

    @property
    def node_call_timeout(self) -> float:
        """Seconds each guest gets in a node-wide call."""
        return self.config.agent.node_call_timeout_seconds

    def node_deadline(self) -> float:
        """When the guest asked now in a node-wide call must have answered everything."""
        return time.monotonic() + self.node_call_timeout

    def per_sandbox(
        self,
        sandboxes: list[SandboxRecord],
        ask: Callable[[SandboxRecord], T],
        fallback: Callable[[SandboxRecord], T],
    ) -> list[T]:
        """``ask`` for every sandbox at once; a sandbox whose answer is not there within the node
        call timeout (or whose ``ask`` failed) gets ``fallback`` (its last known state), so one
        silent or hostile guest costs the others nothing."""
        futures = [self._ask_once(ask, s) for s in sandboxes]
        done, _ = wait_for([f for f in futures if f is not None], timeout=self.node_call_timeout + 1.0)
        out = []
        for sandbox, future in zip(sandboxes, futures, strict=True):
            if future is not None and future in done and future.exception() is None:
                out.append(future.result())
                continue
            if future is not None and future in done:
                log.warning("sandbox %s: %s", sandbox.id, future.exception())
            elif future is not None:
                if future.cancel():  # never started: nothing runs for it any more
                    with self._asking_lock:
                        self._asking.discard(sandbox.id)
                log.info(
                    "sandbox %s did not answer within %.1fs: its last known state is shown",
                    sandbox.id,
                    self.node_call_timeout,
                )
            out.append(fallback(sandbox))
        return out

    def _ask_once(self, ask: Callable[[SandboxRecord], T], sandbox: SandboxRecord) -> Future[T] | None:
        """``ask`` submitted for ``sandbox``, unless an earlier ask for it still runs (None): a slow
        guest holds one worker at most, whatever the rate of node-wide calls."""
        with self._asking_lock:
            if sandbox.id in self._asking:
                return None
            self._asking.add(sandbox.id)

        def run() -> T:
            try:
                return ask(sandbox)
            finally:
                with self._asking_lock:
                    self._asking.discard(sandbox.id)

        try:
            return self.fanout.submit(run)
        except RuntimeError:  # shut down
            with self._asking_lock:
                self._asking.discard(sandbox.id)
            return None

    def close(self) -> None:
        self.fanout.shutdown(wait=False, cancel_futures=True)

    def find_container(self, container_id: str) -> tuple[SandboxRecord, ContainerRecord]:
        """The container with that id and its sandbox.

        Raises:
            NotFound: no sandbox has such a container.
        """
        return self.manager.find_container(container_id)

    def find_container_by_prefix(self, container_id: str) -> tuple[SandboxRecord, ContainerRecord]:
        """As ``find_container``, also for a unique prefix of an id (the short ids crictl shows,
        which containerd accepts too).

        Raises:
            NotFound: no container, or the prefix names more than one.
        """
        try:
            return self.find_container(container_id)
        except NotFound:
            matches = self.manager.ctx.store.containers_starting_with(container_id) if container_id else []
            if len(matches) != 1:
                detail = " (more than one container has an id starting so)" if matches else ""
                raise NotFound(f"container {container_id} not found{detail}") from None
            return self.find_container(matches[0])

    def find_sandbox_by_prefix(self, sandbox_id: str) -> SandboxRecord:
        """The sandbox with that id or, failing that, the only one whose id starts with it.

        Raises:
            NotFound: none, or the prefix names more than one.
        """
        store = self.manager.ctx.store
        try:
            return store.get(sandbox_id)
        except NotFound:
            matches = store.sandboxes_starting_with(sandbox_id) if sandbox_id else []
            if len(matches) != 1:
                detail = " (more than one has an id starting so)" if matches else ""
                raise NotFound(f"pod sandbox {sandbox_id} not found{detail}") from None
            return store.get(matches[0])

    def pod(self, record: SandboxRecord) -> CriPod:
        """The pod's CRI facts; empty ones for a sandbox made below the CRI."""
        return self.store.pod(record.id) or CriPod(id=record.id)

    def container(self, c: ContainerRecord) -> CriContainer:
        """The container's CRI facts; empty ones (but its name) for one made below the CRI."""
        return self.store.container(c.id) or CriContainer(id=c.id, pod_id=c.sandbox_id, name=c.name)


def pod_resources(r: cri.LinuxContainerResources) -> PodResources:
    return PodResources(
        cpu_period=r.cpu_period,
        cpu_quota=r.cpu_quota,
        cpu_shares=r.cpu_shares,
        memory_limit_in_bytes=r.memory_limit_in_bytes,
    )


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """True when every key=value of a CRI label selector is in ``labels``."""
    return all(labels.get(k) == v for k, v in selector.items())


def sandbox_metadata(pod: CriPod) -> cri.PodSandboxMetadata:
    md = pod.metadata
    return cri.PodSandboxMetadata(name=md.name, uid=md.uid, namespace=md.namespace, attempt=md.attempt)


def container_metadata(meta: CriContainer) -> cri.ContainerMetadata:
    return cri.ContainerMetadata(name=meta.name, attempt=meta.attempt)


def pod_sandbox(record: SandboxRecord, pod: CriPod) -> cri.PodSandbox:
    return cri.PodSandbox(
        id=record.id,
        metadata=sandbox_metadata(pod),
        state=SANDBOX_STATES[record.state],
        created_at=record.created_at_ns,
        labels=pod.labels,
        annotations=pod.annotations,
        runtime_handler=pod.runtime_handler,
    )


def container(c: ContainerRecord, meta: CriContainer) -> cri.Container:
    return cri.Container(
        id=c.id,
        pod_sandbox_id=c.sandbox_id,
        metadata=container_metadata(meta),
        image=cri.ImageSpec(image=meta.image),
        image_ref=meta.image_ref,
        image_id=meta.image_id,
        state=CONTAINER_STATES[c.state],
        created_at=c.created_at_ns,
        labels=meta.labels,
        annotations=meta.annotations,
    )


def exit_reason(c: ContainerRecord) -> str:
    """Completed, Error or OOMKilled, as kubelet shows them; empty while the container runs."""
    if c.state is not ContainerState.EXITED:
        return ""
    if c.oom_killed:
        return "OOMKilled"
    return "Completed" if c.exit_code == 0 else "Error"


def container_status(c: ContainerRecord, meta: CriContainer) -> cri.ContainerStatus:
    user = None
    if meta.uid >= 0:
        linux = cri.LinuxContainerUser(uid=meta.uid, gid=meta.gid, supplemental_groups=meta.supplemental_groups)
        user = cri.ContainerUser(linux=linux)
    return cri.ContainerStatus(
        user=user,
        id=c.id,
        metadata=container_metadata(meta),
        state=CONTAINER_STATES[c.state],
        created_at=c.created_at_ns,
        started_at=c.started_at_ns,
        finished_at=c.finished_at_ns,
        exit_code=c.exit_code or 0,
        image=cri.ImageSpec(image=meta.image),
        image_ref=meta.image_ref,
        image_id=meta.image_id,
        reason=exit_reason(c) or c.reason,
        labels=meta.labels,
        annotations=meta.annotations,
        mounts=[
            cri.Mount(
                container_path=m.container_path,
                host_path=m.host_path,
                readonly=m.readonly,
                recursive_read_only=m.recursive_readonly,
                propagation=m.propagation,  # type: ignore[arg-type]
            )
            for m in meta.mounts
        ],
        log_path=c.log_path,
    )

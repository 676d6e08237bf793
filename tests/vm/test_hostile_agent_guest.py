"""Real guests whose agent misbehaves on purpose (``kvmsandbox.misbehave=<scenario>`` on the kernel
command line, see kvmsandbox/agent/guest/misbehave.py): each behaves until the host asks for
container figures, then breaks the protocol one way. For every scenario the sandbox becomes BROKEN
or keeps working as it should; the node-wide CRI calls (run in this process, which is the runtime)
answer within NODE_CALL_BOUND with every other pod right; the runtime's CPU time, threads and RSS
stay bounded; removing the pod leaves nothing.

One well-behaved pod runs throughout, and pods are booted AHEAD of the scenario that needs them, so
a scenario always has other pods beside it and boots overlap with the scenarios before them."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmsandbox.agent.guest import misbehave
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.cri import containers as cri_containers
from kvmsandbox.cri import pods as cri_pods
from kvmsandbox.cri import stats as cri_stats
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.state import CriState
from kvmsandbox.cri.store import CriStore
from kvmsandbox.errors import AgentMisbehaved, DeadlineExceeded, NotFound
from kvmsandbox.guest_image import GuestImage
from kvmsandbox.host.cgroups import HostCgroup
from kvmsandbox.hypervisor.factory import open_hypervisor
from kvmsandbox.image import ImageStore
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.probes import MAX_GUEST_COUNTER
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord
from kvmsandbox.sandbox.states import SandboxState
from tests.conftest import make_config
from tests.vm.leaks import mounts_below, processes_mentioning
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

# Ordered so that the silent guest has three pods beside it.
SCENARIOS = (
    "stats-max",
    "unknown-enum",
    "silence",
    "bad-magic",
    "huge-garbage",
    "undecodable",
    "unknown-ids",
    "endless-output",
    "flood",
)
BREAKS = {"bad-magic", "huge-garbage", "undecodable", "unknown-ids", "unknown-enum"}
AHEAD = 2
NODE_CALL_BOUND = 3.0
# The runtime's own costs a scenario may add (generous: a leak per frame or per request is far more).
MAX_EXTRA_THREADS = 40
MAX_EXTRA_RSS = 256 * 2**20
MAX_QUIET_CPU_SECONDS = 1.5
MIB = 2**20


@dataclass
class Pod:
    sandbox: SandboxRecord
    container: ContainerRecord
    log: Path

    @property
    def id(self) -> str:
        return self.sandbox.id


@dataclass
class Usage:
    """This process's CPU seconds, threads and RSS: the runtime runs in it."""

    cpu: float
    threads: int
    rss: int

    @classmethod
    def now(cls) -> Usage:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        status = Path("/proc/self/status").read_text()
        threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1)) * 1024  # type: ignore[union-attr]
        return cls(ticks / 100, threads, rss)


class Node:
    """The runtime (manager and CRI state in this process), the good pod and the hostile ones."""

    def __init__(self, manager: SandboxManager, state: CriState, layer: Path, logs: Path) -> None:
        self.manager = manager
        self.cri = state
        self.layer = layer
        self.logs = logs
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="boot")
        self.boots: dict[str, Future[Pod]] = {}
        self.removed: set[str] = set()
        self._good = self.pool.submit(self.boot, "good")

    @property
    def good(self) -> Pod:
        return self._good.result()

    def boot(self, name: str, scenario: str | None = None) -> Pod:
        extra = (f"kvmsandbox.misbehave={scenario}",) if scenario else ()
        record = self.manager.create_sandbox(hostname=name, cmdline_extra=extra)
        log = self.logs / f"{name}.log"
        c = self.manager.create_container(
            record.id, lower_dirs=[self.layer], process=ProcessSpec(args=["sleep", "600"]), name=name, log_path=log
        )
        self.manager.start_container(record.id, c.id)
        return Pod(self.manager.get_sandbox(record.id), c, log)

    def pod_for(self, scenario: str) -> Pod:
        """The scenario's pod, booting the next AHEAD ones meanwhile."""
        i = SCENARIOS.index(scenario)
        for s in SCENARIOS[i : i + AHEAD + 1]:
            if s not in self.boots:
                self.boots[s] = self.pool.submit(self.boot, s, s)
        return self.boots[scenario].result()

    def settle(self) -> None:
        """Waits for the boots under way (a figure taken meanwhile would count them)."""
        wait_for(list(self.boots.values()))

    def others(self, hostile: Pod) -> list[Pod]:
        booted = [f.result() for f in self.boots.values() if f.done() and f.exception() is None]
        return [p for p in [self.good, *booted] if p.id != hostile.id and p.id not in self.removed]

    def state_of(self, pod: Pod) -> SandboxState:
        return self.manager.get_sandbox(pod.id).state

    def list_containers(self) -> tuple[float, cri.ListContainersResponse]:
        started = time.monotonic()
        out = cri_containers.list_(self.cri, cri.ListContainersRequest())
        return time.monotonic() - started, out

    def list_stats(self) -> tuple[float, cri.ListPodSandboxStatsResponse]:
        started = time.monotonic()
        out = cri_stats.list_pod_sandbox_stats(self.cri, cri.ListPodSandboxStatsRequest())
        return time.monotonic() - started, out

    def check_node(self, hostile: Pod) -> dict[str, float]:
        """The node-wide calls answer in time, with every other pod ready and its container
        running, its figures from its guest; the hostile pod is listed too. Returns the latencies."""
        others = self.others(hostile)
        listed_in, listed = self.list_containers()
        stats_in, stats = self.list_stats()
        assert listed_in < NODE_CALL_BOUND and stats_in < NODE_CALL_BOUND, (listed_in, stats_in)
        states = {c.id: c.state for c in listed.containers}
        assert hostile.container.id in states
        pods = {p.id: p.state for p in cri_pods.list_(self.cri, cri.ListPodSandboxRequest()).items}
        by_pod = {s.attributes.id: s for s in stats.stats}
        assert hostile.id in by_pod
        for pod in others:
            assert pods[pod.id] == cri.SANDBOX_READY, pod.sandbox.hostname
            assert states[pod.container.id] == cri.CONTAINER_RUNNING, pod.sandbox.hostname
            [figures] = by_pod[pod.id].linux.containers
            assert figures.cpu.usage_core_nano_seconds.value > 0, pod.sandbox.hostname
        return {"ListContainers": listed_in, "ListPodSandboxStats": stats_in}

    def remove(self, pod: Pod) -> None:
        """Removes the pod and checks that nothing of it is left: VM, mounts, files, cgroup,
        the runtime's threads for it."""
        sdir, run_dir = self.manager.sandbox_dir(pod.id), self.manager.run_dir(pod.id)
        self.manager.destroy_sandbox(pod.id)
        self.removed.add(pod.id)
        pod.log.unlink(missing_ok=True)
        with pytest.raises(NotFound):
            self.manager.get_sandbox(pod.id)
        assert processes_mentioning(pod.sandbox.vm_name) == []
        assert mounts_below(sdir) == [] and not sdir.exists() and not run_dir.exists()
        assert not pod.sandbox.cgroup or not HostCgroup(pod.sandbox.cgroup).exists()

        def threads_of_pod() -> list[str]:
            names = [t.name for t in threading.enumerate()]
            return [n for n in names if pod.id in n or pod.container.id[:12] in n]

        wait_until(lambda: not threads_of_pod(), 15, f"the runtime's threads for {pod.sandbox.hostname} to end")


@pytest.fixture(scope="module")
def node(
    guest_image: GuestImage, short_tmp: Path, tmp_path_factory: pytest.TempPathFactory, busybox_layer: Path
) -> Iterator[Node]:
    config = make_config(tmp_path_factory.mktemp("hostile-state"), short_tmp / "hg", "qemu", short_tmp / "no-lv")
    hv = open_hypervisor(
        "qemu", state_dir=config.state_dir, libvirt_uri=None, qemu_binary=config.hypervisor.qemu_binary
    )
    manager = SandboxManager(config, hv, guest_image)
    state = CriState(
        config=config,
        manager=manager,
        images=ImageStore(config.image_dir, config.registry),
        store=CriStore(config.state_dir),
    )
    try:
        n = Node(manager, state, busybox_layer, tmp_path_factory.mktemp("hostile-logs"))
        yield n
        n.pool.shutdown(wait=True, cancel_futures=True)
    finally:
        state.close()
        for record in manager.list_sandboxes():
            manager.destroy_sandbox(record.id)
        manager.close()
        hv.close()


# -- what each scenario does to its own pod ----------------------------------------------------


def trigger(node: Node, pod: Pod, timeout: float = 30) -> None:
    """The call after which the guest misbehaves (UpdateContainer, which no node-wide call makes)."""
    request = pb.UpdateContainerRequest(container_id=pod.container.id, resources_json="{}")
    node.manager.client(pod.id).call("UpdateContainer", request, pb.UpdateContainerResponse, timeout)


def play_breaking(node: Node, pod: Pod) -> None:
    """One bad answer: the call fails, the sandbox is BROKEN, listed with its last known state."""
    with pytest.raises(AgentMisbehaved):
        trigger(node, pod, timeout=60)
    wait_until(lambda: node.state_of(pod) is SandboxState.BROKEN, 10, "the sandbox to be broken")
    assert "broke the protocol" in node.manager.get_sandbox(pod.id).broken_reason


def play_unknown_enum(node: Node, pod: Pod) -> None:
    """A state no version knows leaves the container's last known one; an unknown code breaks."""
    trigger(node, pod)
    listed = {c.id: c.state for c in node.list_containers()[1].containers}
    assert listed[pod.container.id] == cri.CONTAINER_RUNNING
    assert node.state_of(pod) is SandboxState.READY
    with pytest.raises(AgentMisbehaved):
        node.manager.container_stats(pod.id, pod.container.id, timeout=30)
    wait_until(lambda: node.state_of(pod) is SandboxState.BROKEN, 10, "the sandbox to be broken")
    assert "broke the protocol" in node.manager.get_sandbox(pod.id).broken_reason


def play_stats_max(node: Node, pod: Pod) -> None:
    """The largest figures are clamped: counters to MAX_GUEST_COUNTER, memory to the VM's size;
    the CRI's sums stay within uint64; the sandbox keeps working."""
    memory = pod.sandbox.memory_mib * MIB
    trigger(node, pod)
    s = node.manager.container_stats(pod.id, pod.container.id, timeout=30)
    assert s.cpu_usage_ns == MAX_GUEST_COUNTER and s.pids == MAX_GUEST_COUNTER
    assert s.memory_working_set_bytes == memory and s.memory_rss_bytes == memory
    [mine] = [p for p in node.list_stats()[1].stats if p.attributes.id == pod.id]
    [figures] = mine.linux.containers
    assert figures.cpu.usage_core_nano_seconds.value == MAX_GUEST_COUNTER
    assert figures.memory.working_set_bytes.value == memory
    assert mine.linux.cpu.usage_core_nano_seconds.value >= MAX_GUEST_COUNTER
    assert node.state_of(pod) is SandboxState.READY


def play_silence(node: Node, pod: Pod) -> None:
    """A guest that stops answering costs its own calls their deadline and nobody else anything;
    it is listed with its last known state."""
    with pytest.raises(DeadlineExceeded):
        trigger(node, pod, timeout=2)
    node.settle()
    pods = 1 + len(node.others(pod))
    latencies = [node.list_containers()[0] for _ in range(3)]
    listed = {c.id: c.state for c in node.list_containers()[1].containers}
    assert listed[pod.container.id] == cri.CONTAINER_RUNNING
    print(f"\nListContainers with {pods} pods, 1 silent: " + ", ".join(f"{t:.2f}s" for t in latencies))
    assert pods >= 4 and max(latencies) < NODE_CALL_BOUND
    assert node.state_of(pod) is SandboxState.READY


def play_endless_output(node: Node, pod: Pod) -> None:
    """Output that never ends goes to the log as fast as it comes; the sandbox keeps working and
    the node's calls stay quick meanwhile."""
    trigger(node, pod)
    wait_until(lambda: pod.log.stat().st_size > 8 * MIB, 30, "endless output in the log", ignore=(OSError,))
    before, started = Usage.now(), time.monotonic()
    while time.monotonic() - started < 3:
        node.check_node(pod)
    used, seconds = Usage.now().cpu - before.cpu, time.monotonic() - started
    size = pod.log.stat().st_size
    print(f"\nendless output: log {size / MIB:.0f} MiB; runtime CPU {used:.1f}s in {seconds:.1f}s")
    assert node.state_of(pod) is SandboxState.READY


def play_flood(node: Node, pod: Pod) -> None:
    """Answers to ids never sent, 60 KiB each, for 10 s: the host drops them (fewer than its bounds),
    the other pods are served meanwhile, and the trigger's answer still arrives."""
    node.settle()
    before, started = Usage.now(), time.monotonic()
    answer: Future[None] = node.pool.submit(trigger, node, pod, 60)
    peak, latencies = before.rss, []
    while not answer.done():
        latencies.append(max(node.check_node(pod).values()))
        peak = max(peak, Usage.now().rss)
        time.sleep(0.5)
    after, seconds = Usage.now(), time.monotonic() - started
    answer.result()
    console = node.manager.console_log(pod.id)
    over = wait_until(lambda: re.search(rb"flood-over .*frames=(\d+)", console.read_bytes()), 10, "the flood's end")
    frames = int(over.group(1))
    print(
        f"\nflood of {frames} frames of {misbehave.FLOOD_BODY_BYTES // 1024} KiB "
        f"({frames * misbehave.FLOOD_BODY_BYTES / MIB / misbehave.FLOOD_SECONDS:.0f} MiB/s) over {seconds:.1f}s: "
        f"runtime CPU {after.cpu - before.cpu:.1f}s, "
        f"RSS {before.rss / MIB:.0f} -> peak {peak / MIB:.0f} MiB, threads {before.threads} -> {after.threads}, "
        f"slowest node call {max(latencies):.2f}s"
    )
    assert seconds >= misbehave.FLOOD_SECONDS
    assert after.cpu - before.cpu < 0.8 * seconds
    assert peak - before.rss < MAX_EXTRA_RSS
    assert node.state_of(pod) is SandboxState.READY


PLAYS: dict[str, Callable[[Node, Pod], None]] = {
    "bad-magic": play_breaking,
    "huge-garbage": play_breaking,
    "undecodable": play_breaking,
    "unknown-ids": play_breaking,
    "unknown-enum": play_unknown_enum,
    "stats-max": play_stats_max,
    "silence": play_silence,
    "endless-output": play_endless_output,
    "flood": play_flood,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_misbehaving_guest_costs_the_node_nothing(node: Node, scenario: str) -> None:
    pod = node.pod_for(scenario)
    before, started = Usage.now(), time.monotonic()
    try:
        PLAYS[scenario](node, pod)
        expected = SandboxState.BROKEN if scenario in BREAKS else SandboxState.READY
        assert node.state_of(pod) is expected
        latencies = node.check_node(pod)
        after, seconds = Usage.now(), time.monotonic() - started
    finally:
        with contextlib.suppress(NotFound):
            node.remove(pod)
    print(
        f"\n{scenario}: {seconds:.1f}s, runtime CPU {after.cpu - before.cpu:.2f}s, threads {before.threads} -> "
        f"{after.threads}, RSS {before.rss / MIB:.0f} -> {after.rss / MIB:.0f} MiB, "
        + ", ".join(f"{k} {v:.2f}s" for k, v in latencies.items())
    )
    assert after.threads <= before.threads + MAX_EXTRA_THREADS
    assert after.rss <= before.rss + MAX_EXTRA_RSS
    # A guest that only talks costs the runtime a core at most (its output goes to the log line by
    # line); one that breaks the protocol or falls silent costs next to nothing. Boots of the pods
    # ahead run meanwhile in this process and count here too.
    talking = scenario in ("endless-output", "flood")
    assert after.cpu - before.cpu < (0.9 * seconds + 1.0 if talking else MAX_QUIET_CPU_SECONDS)

"""Measuring what a VM pod costs: per sandbox (a snapshot of one running pod) and per node (N pods
booted with an idle container each, `kvmsandbox overhead measure`).

Guest side (from the agent): the memory the guest kernel reserves (VM memory minus MemTotal), the
kernel's and agent's idle use (MemTotal minus MemAvailable), the agent's RSS and CPU. Host side (from
/proc): the VMM's PSS beyond the guest RAM it touched, its CPU at idle and during a container start,
and the runtime's own growth per pod.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.config import Config
from kvmsandbox.errors import FailedPrecondition, KvmSandboxError
from kvmsandbox.host import proc as host
from kvmsandbox.overhead.model import CPU_COMPONENTS, MEMORY_COMPONENTS, Measurement, Sample
from kvmsandbox.sandbox import probes
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.types import NetworkRequest

MIB = 1024 * 1024
IDLE_COMMAND = ["sleep", "2147483647"]


def vmm_pid(manager: SandboxManager, record: SandboxRecord) -> int:
    """Raises FailedPrecondition when the sandbox's VM does not run."""
    return manager.vmm_pid(record.id)


def snapshot(manager: SandboxManager, record: SandboxRecord) -> Sample:
    """The memory one running sandbox costs now (no CPU: that needs a time window).

    Raises:
        FailedPrecondition: the VM does not run. KvmSandboxError: the agent does not answer.
    """
    return Sample(memory=manager.memory_snapshot(record.id))


@dataclass
class _Pod:
    record: SandboxRecord
    pid: int
    sample: Sample
    details: pb.GuestDetailsResponse | None = None
    vmm_cpu: float = 0.0


def _idle_container(manager: SandboxManager, pod: _Pod, layer: Path) -> None:
    """Creates and starts an idle container, measuring the VMM's CPU while it starts."""
    wall0, cpu0 = time.monotonic(), host.cpu_seconds(pod.pid)
    c = manager.create_container(pod.record.id, lower_dirs=[layer], process=ProcessSpec(args=IDLE_COMMAND), name="idle")
    manager.start_container(pod.record.id, c.id)
    wall, cpu = time.monotonic() - wall0, host.cpu_seconds(pod.pid) - cpu0
    pod.sample.cpu["vmm_container_start"] = 1000 * cpu / wall if wall > 0 else 0.0


def _boot_pods(
    manager: SandboxManager,
    layer: Path,
    samples: int,
    network: NetworkRequest | None,
    pods: list[_Pod],
    progress: Callable[[str], None],
    from_template: bool = False,
) -> None:
    """Boots the pods one after the other, each with an idle container; appends each to ``pods``
    as soon as it exists, so the caller destroys it whatever happens next."""
    for i in range(samples):
        progress(f"booting sandbox {i + 1}/{samples}")
        record = manager.create_sandbox(hostname=f"overhead-{i + 1}", network=network, from_template=from_template)
        pod = _Pod(record=record, pid=vmm_pid(manager, record), sample=Sample())
        pods.append(pod)
        progress(f"starting an idle container in sandbox {i + 1}/{samples}")
        _idle_container(manager, pod, layer)


def _measure_idle(
    manager: SandboxManager, pods: list[_Pod], idle_seconds: float
) -> tuple[float, dict[str, pb.GuestDetailsResponse]]:
    """Lets the pods idle for ``idle_seconds`` and fills in each one's CPU and memory; returns the
    window's wall time and the guests' details at its start."""
    start_details = {p.record.id: manager.client(p.record.id).guest_details() for p in pods}
    for p in pods:
        p.vmm_cpu = host.cpu_seconds(p.pid)
    wall0, runtime_cpu1 = time.monotonic(), time.process_time()
    time.sleep(idle_seconds)
    wall = time.monotonic() - wall0
    runtime_idle = 1000 * (time.process_time() - runtime_cpu1) / wall / len(pods)
    for p in pods:
        vmm_cpu = host.cpu_seconds(p.pid) - p.vmm_cpu
        details = manager.client(p.record.id).guest_details()
        before = start_details[p.record.id]
        guest_wall = details.uptime_seconds - before.uptime_seconds or wall
        p.sample.cpu.update(
            {
                "vmm_idle": 1000 * vmm_cpu / wall,
                "runtime_idle": runtime_idle,
                "agent_idle": 1000 * (details.agent_cpu_seconds - before.agent_cpu_seconds) / guest_wall,
                "guest_idle": 1000 * (details.guest_cpu_busy_seconds - before.guest_cpu_busy_seconds) / guest_wall,
            }
        )
        # The guest's own need is taken before any workload: at boot, before the idle container.
        at_boot = {k: v for k, v in p.record.overhead_at_boot.items() if k.startswith(("guest_", "agent_"))}
        p.sample.memory.update(at_boot or probes.guest_memory(details, p.record.memory_mib * MIB))
        p.sample.memory.update(manager.vmm_memory(p.record.id))
        # Negative: what the clone's guest costs the host less than its own figures (0 booted cold).
        p.sample.memory["template_shared"] = -template_saving(p.sample.memory) if p.record.template else 0
    return wall, start_details


def template_saving(memory: dict[str, int]) -> int:
    """What a clone's guest costs the host less than its own view says: its kernel's and agent's
    pages are mostly its template's, shared with every other clone (PSS divides them). The guest's
    cost is taken as its RAM's PSS on the host, never as more than the guest's own figures."""
    guest = memory.get("guest_kernel_reserved", 0) + memory.get("guest_idle_used", 0)
    return max(0, guest - memory.get("vmm_guest_ram_pss", guest))


def measure_node(
    manager: SandboxManager,
    layer: Path,
    samples: int,
    *,
    margin_percent: float,
    idle_seconds: float = 10.0,
    settle_seconds: float = 3.0,
    progress: Callable[[str], None] = lambda _: None,
    from_template: bool = False,
) -> Measurement:
    """Boots ``samples`` sandboxes one after the other (clones of a VM template with
    ``from_template``), each with an idle container from ``layer``, lets them all idle, and
    measures each. Every sandbox is destroyed before returning, also on failure."""
    if samples < 1:
        raise FailedPrecondition("at least one sample is needed")
    config: Config = manager.config
    pods: list[_Pod] = []
    # Measured pods get a network as real ones do, when the node has one.
    network = NetworkRequest(port_mappings=[], args={}) if manager.networking.status().ready else None
    try:
        runtime_before = host.process_pss()
        runtime_cpu0 = time.process_time()
        _boot_pods(manager, layer, samples, network, pods, progress, from_template)
        progress(f"letting {samples} sandboxes settle for {settle_seconds:.0f}s")
        time.sleep(settle_seconds)
        # The runtime's growth with N pods, shared out: per-pod increments are mostly allocator
        # noise (the first pod grows the heap, later ones reuse it).
        runtime_share = max(0, host.process_pss() - runtime_before) // samples
        for p in pods:
            p.sample.memory["runtime_share"] = runtime_share
        progress(f"measuring {samples} idle sandboxes for {idle_seconds:.0f}s")
        wall, start_details = _measure_idle(manager, pods, idle_seconds)
        accel = pods[0].record.accel
        conditions = {
            "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "samples": samples,
            "backend": manager.hypervisor.name,
            "accel": accel,
            "vm_memory_mib": pods[0].record.memory_mib,
            "vcpus": pods[0].record.vcpus,
            "guest_kernel": start_details[pods[0].record.id].kernel_release,
            "guest_image": manager.image.key,
            "tb_cache_mib": config.hypervisor.tb_cache_mib if accel == "tcg" else 0,
            "idle_window_seconds": round(wall, 2),
            "runtime_pss_before_bytes": runtime_before,
            "runtime_cpu_seconds_total": round(time.process_time() - runtime_cpu0, 3),
            "with_network": network is not None,
            # A template's memory is held once per node (its pages no clone touched are in no PSS).
            "template": pods[0].record.template,
            "template_memory_bytes": manager.template_memory_bytes(pods[0].record.template),
            "memory_components": list(MEMORY_COMPONENTS),
            "cpu_components": list(CPU_COMPONENTS),
        }
        return Measurement(samples=[p.sample for p in pods], margin_percent=margin_percent, conditions=conditions)
    finally:
        for i, p in enumerate(pods):
            progress(f"removing sandbox {i + 1}/{len(pods)}")
            with contextlib.suppress(KvmSandboxError):
                manager.destroy_sandbox(p.record.id)

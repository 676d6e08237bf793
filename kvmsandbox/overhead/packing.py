"""The packing model of the scheduling simulation: a workload packed onto one node first-fit, as
the scheduler sees it (requests plus the declared overhead), and what the admitted pods really
cost the node (usage plus the real overhead)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmsandbox.overhead.quantity import format_cpu, format_memory
from kvmsandbox.overhead.sizing import STRUCT_PAGE_FRACTION
from kvmsandbox.overhead.workload import PodSpec


@dataclass(frozen=True)
class Strategy:
    """A declared ``overhead.podFixed``."""

    name: str
    memory_bytes: int
    cpu_millicores: int
    description: str
    # How the reading names it: "with {label}, the scheduler admits ...".
    label: str

    @property
    def pod_fixed(self) -> str:
        return f"{format_memory(self.memory_bytes)}/{format_cpu(self.cpu_millicores)}"


@dataclass(frozen=True)
class StrategyResult:
    """One strategy's packing of the workload and what it costs the node for real."""

    strategy: Strategy
    admitted: tuple[str, ...]
    rejected: tuple[str, ...]
    # Rejected pods that did not fit by memory, by CPU (a pod may count in both).
    rejected_by_memory: int
    rejected_by_cpu: int
    # Sum over admitted pods of requests plus the declared overhead: what the scheduler counted.
    memory_declared_bytes: int
    cpu_declared_millicores: int
    # Sum over admitted pods of usage plus the real overhead: what the node has to hold.
    memory_needed_bytes: int
    # memory_needed_bytes minus node memory: above 0 the node is short by that much.
    memory_over_bytes: int
    memory_need_ratio: float
    # From the first admitted pod whose cumulative real need exceeds the node onward.
    node_oom_risk: tuple[str, ...]
    # Memory-limited pods whose pod cgroup (limit + declared overhead) is below limit + real overhead.
    pod_oom_risk: tuple[str, ...]
    # Both, in admission order.
    at_risk: tuple[str, ...]

    @property
    def rejected_for(self) -> str:
        reasons = [r for r, n in (("memory", self.rejected_by_memory), ("cpu", self.rejected_by_cpu)) if n]
        return "+".join(reasons) or "-"


@dataclass(frozen=True)
class SimulationResult:
    node_memory_bytes: int
    node_cpu_millicores: int
    total_pods: int
    # What a VM pod really costs on this node: the measurement's highest observed figures.
    real_memory_bytes: int
    real_cpu_millicores: float
    samples: int
    margin_percent: float
    strategies: tuple[StrategyResult, ...]
    # Where the workload came from, for the reports.
    workload: str = ""


def real_overhead(pod: PodSpec, measured: int) -> int:
    """What a VM pod really costs beside its containers: the measured overhead, plus, for a pod whose
    VM is sized from its memory limit, the guest's page structs for that memory (1/64 of it), which
    a measurement on a default-sized VM does not include."""
    return measured + (pod.limits_memory // STRUCT_PAGE_FRACTION if pod.limits_memory else 0)


def pack(
    strategy: Strategy, workload: Sequence[PodSpec], node_memory: int, node_cpu: int, real_memory: int
) -> StrategyResult:
    """First fit in workload order, as the scheduler does it for one node, then the real cost of what fit."""
    admitted: list[PodSpec] = []
    rejected: list[str] = []
    by_memory = by_cpu = 0
    used_memory = used_cpu = 0
    for pod in workload:
        memory = pod.requests_memory + strategy.memory_bytes
        cpu = pod.requests_cpu + strategy.cpu_millicores
        fits_memory = used_memory + memory <= node_memory
        fits_cpu = used_cpu + cpu <= node_cpu
        if fits_memory and fits_cpu:
            admitted.append(pod)
            used_memory += memory
            used_cpu += cpu
        else:
            rejected.append(pod.name)
            by_memory += not fits_memory
            by_cpu += not fits_cpu

    needed = 0
    node_risk: list[str] = []
    for pod in admitted:
        needed += pod.usage_memory + real_overhead(pod, real_memory)
        if node_risk or needed > node_memory:
            node_risk.append(pod.name)
    # The kubelet bounds a memory-limited pod's cgroup at limit + podFixed; the VMM lives in there too.
    pod_risk = [
        pod.name
        for pod in admitted
        if pod.limits_memory is not None
        and pod.limits_memory + strategy.memory_bytes < pod.limits_memory + real_overhead(pod, real_memory)
    ]
    risky = set(node_risk) | set(pod_risk)
    return StrategyResult(
        strategy=strategy,
        admitted=tuple(p.name for p in admitted),
        rejected=tuple(rejected),
        rejected_by_memory=by_memory,
        rejected_by_cpu=by_cpu,
        memory_declared_bytes=used_memory,
        cpu_declared_millicores=used_cpu,
        memory_needed_bytes=needed,
        memory_over_bytes=needed - node_memory,
        memory_need_ratio=needed / node_memory,
        node_oom_risk=tuple(node_risk),
        pod_oom_risk=tuple(pod_risk),
        at_risk=tuple(p.name for p in admitted if p.name in risky),
    )

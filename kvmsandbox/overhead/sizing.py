"""VM size from what the pod asks for, and the pod's declared overhead next to the measured one.

The kubelet sends the sum of its containers' limits as ``LinuxPodSandboxConfig.resources`` and the
RuntimeClass's ``overhead.podFixed`` as ``LinuxPodSandboxConfig.overhead``. The VM gets the
containers' memory plus what the guest itself needs (kernel reservation and idle use, as measured
on this node), so a container can use its whole limit without the guest running short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIB = 1024 * 1024
# The guest kernel keeps a 64-byte struct page per 4 KiB page: 1/64 of any memory added to the VM.
STRUCT_PAGE_FRACTION = 64
# QEMU and the guest both like 2 MiB multiples (huge pages, memory blocks).
MEMORY_GRANULE_MIB = 2
CPU_SHARES_PER_CORE = 1024


@dataclass(frozen=True)
class PodResources:
    """The subset of a CRI LinuxContainerResources that sizing and the overhead check read."""

    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_in_bytes: int = 0

    @property
    def cpu_millicores(self) -> int:
        """From quota/period when set (a limit), else from shares (a request); 0 when neither."""
        if self.cpu_quota > 0 and self.cpu_period > 0:
            return math.ceil(self.cpu_quota * 1000 / self.cpu_period)
        # The kubelet gives 2 shares to a pod that asks for no CPU: that is not a declaration.
        if self.cpu_shares > 2:
            return math.ceil(self.cpu_shares * 1000 / CPU_SHARES_PER_CORE)
        return 0


@dataclass(frozen=True)
class VmSize:
    vcpus: int
    memory_mib: int
    # One sentence per dimension: where the figure came from.
    reason: str


def size_vm(
    resources: PodResources,
    *,
    default_vcpus: int,
    default_memory_mib: int,
    min_memory_mib: int,
    max_vcpus: int,
    guest_memory_bytes: int,
) -> VmSize:
    """The VM for a pod: its containers' limits plus the guest's own need, or the defaults.

    Memory: limits + guest need + the struct pages for the limits, rounded up to 2 MiB, at least
    ``min_memory_mib``. vCPUs: the CPU limit rounded up to whole cores, at least 1 and at most
    ``max_vcpus``.
    """
    limit = resources.memory_limit_in_bytes
    if limit > 0:
        raw = limit + guest_memory_bytes + limit // STRUCT_PAGE_FRACTION
        memory = math.ceil(raw / (MEMORY_GRANULE_MIB * MIB)) * MEMORY_GRANULE_MIB
        memory = max(memory, min_memory_mib)
        memory_reason = (
            f"memory {memory} MiB = limits {limit / MIB:.0f} MiB + guest {guest_memory_bytes / MIB:.0f} MiB"
            f" + page tables {limit // STRUCT_PAGE_FRACTION / MIB:.0f} MiB"
        )
    else:
        memory = default_memory_mib
        memory_reason = f"memory {memory} MiB: no memory limit, the configured default"
    if resources.cpu_quota > 0 and resources.cpu_period > 0:
        wanted = math.ceil(resources.cpu_quota / resources.cpu_period)
        vcpus = min(max(1, wanted), max(1, max_vcpus))
        cpu_reason = f"{vcpus} vCPU for a CPU limit of {resources.cpu_millicores}m"
        if vcpus < wanted:
            cpu_reason += f" (capped at {max_vcpus})"
    else:
        vcpus = min(default_vcpus, max(1, max_vcpus))
        cpu_reason = f"{vcpus} vCPU: no CPU limit, the configured default"
    return VmSize(vcpus=vcpus, memory_mib=memory, reason=f"{memory_reason}; {cpu_reason}")


@dataclass(frozen=True)
class OverheadCheck:
    declared_memory_bytes: int
    declared_cpu_millicores: int
    measured_memory_bytes: int
    measured_cpu_millicores: float
    # "" when what is declared covers what is measured.
    warning: str


def check_declared(declared: PodResources, measured_memory_bytes: int, measured_cpu_millicores: float) -> OverheadCheck:
    """Compares the RuntimeClass overhead a pod declares with what this node measured.

    ``measured_cpu_millicores`` of 0 means "not measured" (a pod's own boot measurement has no CPU
    window) and is not compared.
    """
    mem = declared.memory_limit_in_bytes
    cpu = declared.cpu_millicores
    problems = []
    if mem < measured_memory_bytes:
        problems.append(
            f"memory {mem / MIB:.0f} MiB is below the measured {measured_memory_bytes / MIB:.0f} MiB"
            if mem
            else f"no memory overhead is declared but a pod measurably costs {measured_memory_bytes / MIB:.0f} MiB"
        )
    if measured_cpu_millicores > 0 and cpu < measured_cpu_millicores:
        problems.append(
            f"cpu {cpu}m is below the measured {measured_cpu_millicores:.0f}m"
            if cpu
            else f"no cpu overhead is declared but a pod measurably costs {measured_cpu_millicores:.0f}m"
        )
    warning = ""
    if problems:
        warning = (
            "the pod's declared overhead (RuntimeClass overhead.podFixed) is too low: "
            + "; ".join(problems)
            + ". The scheduler will overcommit this node and the pod's cgroup may OOM-kill its VM; "
            "set podFixed from `kvmsandbox overhead runtimeclass`"
        )
    return OverheadCheck(mem, cpu, measured_memory_bytes, measured_cpu_millicores, warning)

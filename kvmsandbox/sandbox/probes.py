"""What one sandbox costs and uses, read from its guest (the agent) and from the host (/proc, its
VMM's cgroup, its writable layers). The node-wide measurement in ``kvmsandbox.overhead`` builds on
these."""

from __future__ import annotations

import logging
import time

from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import FailedPrecondition, NotFound
from kvmsandbox.host import beneath, proc
from kvmsandbox.host.cgroups import HostCgroup
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.sandbox import disks, rootfs
from kvmsandbox.sandbox.context import SandboxContext
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.types import ContainerStats, FilesystemUsage, VmUsage

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def guest_memory(details: pb.GuestDetailsResponse, vm_memory_bytes: int) -> dict[str, int]:
    """The guest side of a sample from the agent's GuestDetails."""
    return {
        "guest_kernel_reserved": max(0, vm_memory_bytes - details.mem_total_bytes),
        "guest_idle_used": max(0, details.mem_total_bytes - details.mem_available_bytes),
        "agent_rss": details.agent_rss_bytes,
    }


def vmm_pid(ctx: SandboxContext, record: SandboxRecord) -> int:
    """Raises FailedPrecondition when the sandbox's VM does not run."""
    info = ctx.hypervisor.info(record.vm_name)
    if info is None or not info.running or not info.pid:
        raise FailedPrecondition(f"sandbox {record.id}: its VM {record.vm_name} is not running")
    return info.pid


def vmm_memory(ctx: SandboxContext, record: SandboxRecord) -> dict[str, int]:
    """The host side of a sample: the VMM's memory beyond the guest's RAM, with its parts. The
    virtio-fs daemon serving the pod is part of its VMM: its PSS beyond the guest RAM it maps counts."""
    ram = record.memory_mib * MIB
    tcg_cache = ctx.config.hypervisor.tb_cache_mib * MIB if record.accel == "tcg" else 0
    mem = proc.vmm_memory(vmm_pid(ctx, record), ram, tcg_cache)
    daemons = 0
    for pid in virtiofsd.running_for(ctx.sandbox_dir(record.id) / rootfs.SHARED):
        try:
            daemons += proc.vmm_memory(pid, ram).beyond_guest_ram
        except NotFound:
            continue
    return {
        "vmm_beyond_guest_ram": mem.beyond_guest_ram + daemons,
        "vmm_tcg_cache": mem.tcg_cache_pss,
        "vmm_guest_ram_touched": mem.guest_ram_rss,
        # What the guest's RAM costs the host, pages shared with other clones of a template divided.
        "vmm_guest_ram_pss": mem.guest_ram_pss,
        "vmm_pss": mem.pss + daemons,
    }


def memory_snapshot(
    ctx: SandboxContext, record: SandboxRecord, details: pb.GuestDetailsResponse | None = None
) -> dict[str, int]:
    """The memory one running sandbox costs now, by component, in bytes; ``details`` saves asking
    the agent again.

    Raises:
        FailedPrecondition: the VM does not run or the sandbox is not ready. KvmSandboxError: the
        agent does not answer.
    """
    details = details or ctx.ready_client(record).guest_details()
    memory = guest_memory(details, record.memory_mib * MIB)
    memory.update(vmm_memory(ctx, record))
    return memory


def vm_usage(ctx: SandboxContext, record: SandboxRecord) -> VmUsage:
    """CPU from the VMM process (every thread, since it started); memory from the sandbox's host
    cgroup when it has one, else the VMM's resident set.

    Raises:
        FailedPrecondition: the VM does not run.
    """
    pid = vmm_pid(ctx, record)
    cpu_ns = int(proc.cpu_seconds(pid) * 1e9)
    if record.cgroup:
        cg = HostCgroup(record.cgroup)
        if cg.exists():
            u = cg.usage()
            return VmUsage(
                time.time_ns(), cpu_ns, u.memory_usage_bytes, u.memory_working_set_bytes, f"cgroup {record.cgroup}"
            )
    mem = proc.vmm_memory(pid, record.memory_mib * MIB)
    return VmUsage(time.time_ns(), cpu_ns, mem.rss, mem.rss, f"process {pid}")


# Figures a guest reports are clamped: no counter of a real container comes near 2^62, and a
# pod's memory figures cannot exceed its VM's memory. Sums over a pod's containers then fit.
MAX_GUEST_COUNTER = 2**62


def container_stats(
    ctx: SandboxContext, record: SandboxRecord, container_id: str, timeout: float | None = None
) -> ContainerStats:
    """The container's cgroup figures from its guest, clamped to what the VM can hold.

    Raises:
        FailedPrecondition: the sandbox is not ready. KvmSandboxError: the agent's error.
    """
    s = ctx.ready_client(record).container_stats(container_id, timeout)
    memory = record.memory_mib << 20

    def clamp(value: int, ceiling: int) -> int:
        return min(max(0, value), ceiling)

    return ContainerStats(
        timestamp_ns=clamp(s.timestamp_ns, MAX_GUEST_COUNTER),
        cpu_usage_ns=clamp(s.cpu_usage_ns, MAX_GUEST_COUNTER),
        memory_working_set_bytes=clamp(s.memory_working_set_bytes, memory),
        memory_usage_bytes=clamp(s.memory_usage_bytes, memory),
        memory_rss_bytes=clamp(s.memory_rss_bytes, memory),
        memory_limit_bytes=clamp(s.memory_limit_bytes, MAX_GUEST_COUNTER),
        pids=clamp(s.pids, MAX_GUEST_COUNTER),
    )


def writable_layer(ctx: SandboxContext, sandbox_id: str, container_id: str) -> FilesystemUsage:
    """(bytes, inodes) of the container's writable layer, counted on the host (0 once it is gone).
    A disk: the blocks its file holds. A host overlay ("share" rootfs): a bounded walk through fds
    (``beneath.tree_usage``), so a guest's tree can neither lead the host elsewhere nor make a
    stats call for the node expensive; past the bound it is a lower bound."""
    sdir = ctx.sandbox_dir(sandbox_id)
    try:
        c = ctx.store.get(sandbox_id).containers.get(container_id)
    except NotFound:
        c = None
    if c is not None and c.layer_keys:
        # A disk: what its file holds on the host beyond a fresh filesystem (the guest cannot lie
        # about that). Inodes are the guest filesystem's business: not counted.
        path = disks.writable_path(ctx, sandbox_id, container_id)
        used = max(0, disks.allocated_bytes(path) - c.writable_baseline_bytes) if c.writable_target else 0
        return FilesystemUsage(mountpoint=str(path.parent), used_bytes=used, inodes_used=0)
    usage = beneath.tree_usage(sdir, f"layers/{container_id}/upper")
    if not usage.complete:
        log.debug("sandbox %s container %s: writable layer counted in part", sandbox_id, container_id)
    return FilesystemUsage(mountpoint=str(sdir), used_bytes=usage.used_bytes, inodes_used=usage.entries)

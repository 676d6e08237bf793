"""The measurement as a person reads it: one row per component with min/median/max over the
samples, the recommended podFixed and the sum that justifies it."""

from __future__ import annotations

from kvmsandbox.overhead.model import CPU_COMPONENTS, CPU_DETAILS, MEMORY_COMPONENTS, MEMORY_DETAILS, Measurement

MIB = 1024 * 1024

LABELS = {
    "guest_kernel_reserved": "guest kernel reservation (VM memory - MemTotal)",
    "guest_idle_used": "guest idle use, kernel + agent (MemTotal - MemAvailable)",
    "template_shared": "guest pages shared with other clones (template pods)",
    "vmm_beyond_guest_ram": "VMM PSS beyond the guest RAM it touched",
    "runtime_share": "runtime's growth with N pods / N (PSS)",
    "agent_rss": "  of which: agent RSS (in guest idle use)",
    "vmm_tcg_cache": "  of which: TCG translation cache (in VMM)",
    "vmm_guest_ram_touched": "  guest RAM touched on the host (RSS)",
    "vmm_guest_ram_pss": "  guest RAM on the host, shared pages divided (PSS)",
    "vmm_pss": "  VMM PSS, all of it",
    "vmm_idle": "VMM threads at idle (all guest work)",
    "runtime_idle": "runtime's share at idle",
    "agent_idle": "  of which: agent at idle (guest clock)",
    "guest_idle": "  of which: all guest CPUs busy at idle",
    "vmm_container_start": "  VMM during a container start (burst, not in podFixed)",
}


def _row(label: str, lo: float, mid: float, hi: float, unit: str) -> str:
    fmt = "{:>9.1f}" if unit == "MiB" else "{:>9.0f}"
    cells = " ".join(fmt.format(v) for v in (lo, mid, hi))
    return f"  {label:<58} {cells}  {unit}"


def render_measurement(m: Measurement) -> str:
    c = m.conditions
    n = len(m.samples)
    lines = [
        f"Pod overhead on this node: {n} sandbox{'es' if n != 1 else ''}, backend {c.get('backend', '?')}, "
        f"accel {c.get('accel', '?')}, VM {c.get('vm_memory_mib', '?')} MiB / {c.get('vcpus', '?')} vCPU, "
        f"guest kernel {c.get('guest_kernel', '?')}",
        "",
        f"  {'memory':<58} {'min':>9} {'median':>9} {'max':>9}",
    ]
    for k in MEMORY_COMPONENTS + MEMORY_DETAILS:
        s = m.memory_spread(k)
        lines.append(_row(LABELS[k], s.min / MIB, s.median / MIB, s.max / MIB, "MiB"))
    totals = [s.memory_total / MIB for s in m.samples]
    lines.append(_row("total memory overhead", min(totals), sorted(totals)[len(totals) // 2], max(totals), "MiB"))
    lines += ["", f"  {'cpu':<58} {'min':>9} {'median':>9} {'max':>9}"]
    for k in CPU_COMPONENTS + CPU_DETAILS:
        s = m.cpu_spread(k)
        lines.append(_row(LABELS[k], s.min, s.median, s.max, "m"))
    cpu_totals = [s.cpu_total for s in m.samples]
    lines.append(
        _row("total cpu overhead", min(cpu_totals), sorted(cpu_totals)[len(cpu_totals) // 2], max(cpu_totals), "m")
    )
    worst = max(m.samples, key=lambda s: s.memory_total)
    parts = " + ".join(f"{worst.memory.get(k, 0) / MIB:.1f}" for k in MEMORY_COMPONENTS)
    lines += [
        "",
        f"Recommended podFixed: memory {m.recommended_memory_bytes // MIB}Mi, cpu {m.recommended_cpu_millicores}m",
        f"  memory = highest observed total {m.observed_memory_bytes / MIB:.1f} MiB ({parts} MiB: "
        f"{', '.join(MEMORY_COMPONENTS)}) + {m.margin_percent:g}% margin, rounded up to 1 MiB",
        f"  cpu    = highest observed idle {m.observed_cpu_millicores:.1f}m (VMM + runtime share) "
        f"+ {m.margin_percent:g}% margin, rounded up to 10m",
        f"  VMs are sized with {m.guest_memory_bytes / MIB:.1f} MiB for the guest itself "
        "(kernel reservation + idle use) on top of the pod's limits.",
    ]
    if c.get("accel") == "tcg":
        lines.append(
            f"  Measured under TCG: the VMM's figure includes a {c.get('tb_cache_mib', 0)} MiB translation "
            "cache and emulated guest CPU time that a KVM host does not spend."
        )
    return "\n".join(lines)

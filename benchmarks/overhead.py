"""Overhead benchmark: the podFixed this node measures over N pods, beside Kata's published
defaults and beside the measurement's own spread.

    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py [--pods N] [--backend libvirt|qemu]
    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py --density 1,4,8

``--density`` (qemu backend) compares cold pods with clones of a VM template instead: for each
count, that many pods with an idle container each, then the host's PSS per pod (QEMU and its
virtio-fs daemon; for clones also the template's memory shared out over them).

Boots N sandboxes (each with an idle busybox container) in a temporary state dir, lets them idle,
measures every component (see `kvmsandbox overhead measure`) and prints the recommended podFixed
next to what Kata ships. Run as root on a host set up by `make setup`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import bench_manager

from kvmsandbox.overhead.measure import measure_node
from kvmsandbox.overhead.report import render_measurement
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs

MIB = 1024 * 1024
# Kata Containers' RuntimeClass overhead.podFixed defaults (memory MiB, cpu millicores).
KATA = [
    ("kata-qemu (until 2026)", 160, 250),
    ("kata-qemu (2026, after VMM OOM kills)", 320, 250),
    ("kata-clh", 130, 250),
    ("kata-fc", 130, 250),
]


def density_round(manager: SandboxManager, layer: Path, count: int, from_template: bool) -> dict[str, float]:
    """Per pod (MiB) of ``count`` idle pods: host PSS, with the template's memory shared out, and
    the parts (TCG's translation cache, the guest's RAM)."""
    records: list[SandboxRecord] = []
    try:
        for i in range(count):
            record = manager.create_sandbox(f"density-{int(from_template)}-{i}", from_template=from_template)
            records.append(record)
            c = manager.create_container(
                record.id, lower_dirs=[layer], process=ProcessSpec(args=["sleep", "2147483647"]), name="idle"
            )
            manager.start_container(record.id, c.id)
            if from_template and not record.template:
                raise SystemExit("a clone booted cold: no template numbers")
        time.sleep(5)
        figures = [manager.vmm_memory(r.id) for r in records]

        def mean(key: str) -> float:
            return sum(f[key] for f in figures) / count / MIB

        template = manager.template_memory_bytes(records[0].template) / count / MIB
        pss = mean("vmm_pss")
        return {"pss": pss, "all": pss + template, "tcg": mean("vmm_tcg_cache"), "ram": mean("vmm_guest_ram_pss")}
    finally:
        for record in records:
            manager.destroy_sandbox(record.id)


def density(manager: SandboxManager, layer: Path, counts: list[int]) -> None:
    manager.templates.build(1, manager.config.sandbox.memory_mib)
    rows = []
    for count in counts:
        print(f"  {count} cold pods ...", file=sys.stderr, flush=True)
        cold = density_round(manager, layer, count, False)
        print(f"  {count} clones ...", file=sys.stderr, flush=True)
        rows.append((count, cold, density_round(manager, layer, count, True)))
    size = manager.config.sandbox.memory_mib
    print(f"\nhost PSS per pod, MiB ({size} MiB VMs, an idle container each, accel {manager.accel})")
    print(f"  {'pods':>4} {'cold':>7} {'clone':>7} {'+tmpl':>7} {'ratio':>6}   "
          f"{'guest RAM cold/clone':>21} {'TCG cache cold/clone':>21} {'ratio w/o TCG':>14}")  # fmt: skip
    for count, cold, clone in rows:
        without = (clone["all"] - clone["tcg"]) / (cold["pss"] - cold["tcg"])
        print(f"  {count:>4} {cold['pss']:>7.1f} {clone['pss']:>7.1f} {clone['all']:>7.1f} "
              f"{clone['all'] / cold['pss']:>6.2f}   {cold['ram']:>10.1f} /{clone['ram']:>9.1f} "
              f"{cold['tcg']:>10.1f} /{clone['tcg']:>9.1f} {without:>14.2f}")  # fmt: skip
    print("  +tmpl: with all of the template's memory (held once per node) divided among the clones: an upper")
    print("  bound, as the template pages a clone maps are in its PSS already. The ratios are on it (goal <= 0.50")
    print("  at 8 pods). KVM hosts have no TCG cache: the last column.")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pods", type=int, default=5)
    parser.add_argument("--backend", choices=["libvirt", "qemu"], default="libvirt")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--margin", type=float, default=10.0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/kvmsandbox"))
    parser.add_argument("--density", help="comma-separated pod counts: cold pods against template clones")
    args = parser.parse_args()
    if args.density:
        counts = [int(n) for n in args.density.split(",")]
        with bench_manager("qemu", args.cache_dir) as (manager, work):
            density(manager, make_busybox_rootfs(work / "busybox"), counts)
        return 0

    with bench_manager(args.backend, args.cache_dir) as (manager, work):
        layer = make_busybox_rootfs(work / "busybox")
        t0 = time.monotonic()
        m = measure_node(
            manager,
            layer,
            args.pods,
            margin_percent=args.margin,
            idle_seconds=args.idle_seconds,
            progress=lambda s: print(f"  [{time.monotonic() - t0:6.1f}s] {s}", file=sys.stderr, flush=True),
        )

    print(render_measurement(m))
    totals = [s.memory_total / MIB for s in m.samples]
    mem, cpu = m.recommended_memory_bytes / MIB, m.recommended_cpu_millicores
    print(
        f"\nspread of the total memory overhead over {len(totals)} pods: min {min(totals):.1f}, "
        f"median {statistics.median(totals):.1f}, max {max(totals):.1f} MiB "
        f"(max - min = {max(totals) - min(totals):.1f} MiB, margin added {mem - max(totals):.1f} MiB)"
    )
    print(f"\n  {'podFixed':<40} {'memory':>8} {'cpu':>6} {'/ measured':>11}  against the highest pod")
    print(f"  {'kvmsandbox, measured here':<40} {mem:>6.0f}Mi {cpu:>5}m {1:>11.2f}  covers it")
    for name, kata_mem, kata_cpu in KATA:
        verdict = "covers it" if kata_mem >= max(totals) else "BELOW what a pod costs"
        print(f"  {name:<40} {kata_mem:>6}Mi {kata_cpu:>5}m {kata_mem / mem:>11.2f}  {verdict}")
    tcg = m.memory_spread("vmm_tcg_cache").max / MIB
    if tcg:
        print(
            f"\nof the measured overhead, {tcg:.0f} MiB is TCG's translation cache, which a KVM host does not have; "
            f"without it the highest total would be {max(totals) - tcg:.1f} MiB."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

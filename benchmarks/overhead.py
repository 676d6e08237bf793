"""Overhead benchmark: the podFixed this node measures over N pods, beside Kata's published
defaults and beside the measurement's own spread.

    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py [--pods N] [--backend libvirt|qemu]

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
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs

MIB = 1024 * 1024
# Kata Containers' RuntimeClass overhead.podFixed defaults (memory MiB, cpu millicores).
KATA = [
    ("kata-qemu (until 2026)", 160, 250),
    ("kata-qemu (2026, after VMM OOM kills)", 320, 250),
    ("kata-clh", 130, 250),
    ("kata-fc", 130, 250),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pods", type=int, default=5)
    parser.add_argument("--backend", choices=["libvirt", "qemu"], default="libvirt")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--margin", type=float, default=10.0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/kvmsandbox"))
    args = parser.parse_args()

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

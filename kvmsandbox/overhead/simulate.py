"""The scheduling experiment behind ``kvmsandbox overhead simulate``: what the pod overhead a
RuntimeClass declares does to one node.

A workload is packed onto one node three times, each time with a different ``overhead.podFixed``
(none, Kata's fixed default, the one measured here). The scheduler only sees requests plus the
declared overhead; what a VM pod really costs is the measured overhead. The gap shows up as pods
the node cannot hold (node-level OOM risk) and as pod cgroups too small for their VMM (pod-level).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.overhead.model import Measurement
from kvmsandbox.overhead.packing import SimulationResult, Strategy, pack
from kvmsandbox.overhead.quantity import format_cpu, format_memory, parse_cpu, parse_memory
from kvmsandbox.overhead.simulation_report import render_markdown, render_png
from kvmsandbox.overhead.workload import PodSpec, load_workload

MIB = 1024 * 1024

# Kata Containers' kata-deploy RuntimeClasses declare a fixed podFixed per hypervisor, whatever the
# node. kata-qemu shipped 160Mi/250m for years; newer charts raise QEMU to 320Mi because, with the
# VMM inside the pod cgroup (sandbox_cgroup_only), 160Mi let the VMM of small-limit pods be
# OOM-killed. kata-clh and kata-fc declare 130Mi/250m. The "kata" strategy uses the long-shipped
# QEMU figures. (kata-containers: tools/packaging/kata-deploy/helm-chart/.../runtimeclasses.yaml)
KATA_QEMU_MEMORY_BYTES = 160 * MIB
KATA_QEMU_CPU_MILLICORES = 250
KATA_QEMU_RAISED_MEMORY_BYTES = 320 * MIB
KATA_CLH_MEMORY_BYTES = 130 * MIB
KATA_FC_MEMORY_BYTES = 130 * MIB


def strategies(measurement: Measurement) -> tuple[Strategy, ...]:
    """The three declared overheads compared: none, Kata's fixed default, and this node's recommendation."""
    return (
        Strategy(
            "none", 0, 0, "no overhead declared (a RuntimeClass without overhead.podFixed)", "no overhead declared"
        ),
        Strategy(
            "kata",
            KATA_QEMU_MEMORY_BYTES,
            KATA_QEMU_CPU_MILLICORES,
            "Kata Containers' fixed kata-qemu default, the same on every node",
            f"Kata's fixed {format_memory(KATA_QEMU_MEMORY_BYTES)}/{format_cpu(KATA_QEMU_CPU_MILLICORES)}",
        ),
        Strategy(
            "measured",
            measurement.recommended_memory_bytes,
            measurement.recommended_cpu_millicores,
            f"this node's highest observed overhead plus a {measurement.margin_percent:g}% margin",
            f"the measured {format_memory(measurement.recommended_memory_bytes)}/"
            f"{format_cpu(measurement.recommended_cpu_millicores)}",
        ),
    )


def simulate(
    workload: Sequence[PodSpec],
    node_memory_bytes: int,
    node_cpu_millicores: int,
    measurement: Measurement,
    source: str = "",
) -> SimulationResult:
    """Pack ``workload`` onto one node under each strategy; ``source`` names the workload in the reports."""
    if node_memory_bytes <= 0 or node_cpu_millicores <= 0:
        raise InvalidArgument("the node needs some memory and some CPU to hold pods")
    real_memory = measurement.observed_memory_bytes
    return SimulationResult(
        node_memory_bytes=node_memory_bytes,
        node_cpu_millicores=node_cpu_millicores,
        total_pods=len(workload),
        real_memory_bytes=real_memory,
        real_cpu_millicores=measurement.observed_cpu_millicores,
        samples=len(measurement.samples),
        margin_percent=measurement.margin_percent,
        strategies=tuple(
            pack(s, workload, node_memory_bytes, node_cpu_millicores, real_memory) for s in strategies(measurement)
        ),
        workload=source,
    )


def run_simulation(
    node_memory: str, node_cpu: str, pods_file: Path, measurement: Measurement, out_dir: Path
) -> SimulationResult:
    """Parse the command's arguments, simulate, write ``simulation.md`` and ``simulation.png`` to ``out_dir``."""
    node_memory_bytes = parse_memory(node_memory, what="--node-memory")
    node_cpu_millicores = parse_cpu(node_cpu, what="--node-cpu")
    if node_memory_bytes <= 0:
        raise InvalidArgument(f"--node-memory {node_memory!r}: the node needs some memory to hold pods")
    if node_cpu_millicores <= 0:
        raise InvalidArgument(f"--node-cpu {node_cpu!r}: the node needs some CPU to hold pods")
    workload = load_workload(pods_file)
    result = simulate(workload, node_memory_bytes, node_cpu_millicores, measurement, source=str(pods_file))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "simulation.md").write_text(render_markdown(result))
    render_png(result, out_dir / "simulation.png")
    return result

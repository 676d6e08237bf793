"""The scheduling experiment behind ``kvmsandbox overhead simulate``: what the pod overhead a
RuntimeClass declares does to one node.

A workload is packed onto one node three times, each time with a different ``overhead.podFixed``
(none, Kata's fixed default, the one measured here). The scheduler only sees requests plus the
declared overhead; what a VM pod really costs is the measured overhead. The gap shows up as pods
the node cannot hold (node-level OOM risk) and as pod cgroups too small for their VMM (pod-level).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.overhead.model import Measurement
from kvmsandbox.overhead.quantity import format_cpu, format_memory, parse_cpu, parse_memory
from kvmsandbox.overhead.sizing import STRUCT_PAGE_FRACTION

MIB = 1024 * 1024
GIB = 1024 * MIB

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

# A node holds 110 pods by default; far more in one file is a typo (count: 100000), not a workload.
MAX_PODS = 10_000

_POD_KEYS = ("name", "count", "requests", "limits", "usage")
_RESOURCE_KEYS = {"requests": ("memory", "cpu"), "limits": ("memory", "cpu"), "usage": ("memory",)}


@dataclass(frozen=True)
class PodSpec:
    """One pod of the workload: memory in bytes, CPU in millicores."""

    name: str
    requests_memory: int
    requests_cpu: int
    # Set when the pod's memory is bounded: the kubelet then limits the pod cgroup to this plus podFixed.
    limits_memory: int | None
    # What the containers really use.
    usage_memory: int


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


# --- workload file ------------------------------------------------------------------------------


def _resources(entry: dict[str, Any], key: str, where: str) -> dict[str, int]:
    """The entry's ``requests``/``limits``/``usage`` mapping, parsed; {} when the key is absent."""
    raw = entry.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: {key} must be a mapping such as {{memory: 256Mi, cpu: 100m}}")
    allowed = _RESOURCE_KEYS[key]
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key {key}.{unknown[0]} (allowed in {key}: {', '.join(allowed)})")
    parsed: dict[str, int] = {}
    for resource, value in raw.items():
        what = f"{where}: {key}.{resource}"
        parsed[resource] = parse_memory(value, what=what) if resource == "memory" else parse_cpu(value, what=what)
    return parsed


def _pod_entry(entry: Any, index: int, source: str) -> tuple[str, int, PodSpec]:
    """One entry of ``pods:`` as (name, count, the spec every copy shares)."""
    where = f"{source}: pods entry {index}"
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where} must be a mapping with name, count, requests, limits and usage")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(f"{where} has no name (every entry needs `name:`)")
    where = f"{where} ({name})"
    unknown = sorted(str(k) for k in entry if k not in _POD_KEYS)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(_POD_KEYS)})")
    count = entry.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgument(f"{where}: count must be a whole number of 1 or more, not {count!r}")
    if "requests" not in entry:
        raise InvalidArgument(f"{where} has no requests (the scheduler packs pods by requests.memory and requests.cpu)")
    requests = _resources(entry, "requests", where)
    limits = _resources(entry, "limits", where)
    usage = _resources(entry, "usage", where)
    if "memory" not in requests:
        raise InvalidArgument(f"{where} has no requests.memory (the scheduler packs pods by it)")
    limit = limits.get("memory")
    if limit is not None and requests["memory"] > limit:
        raise InvalidArgument(f"{where}: requests.memory is above limits.memory, which Kubernetes refuses")
    if "cpu" in limits and requests.get("cpu", 0) > limits["cpu"]:
        raise InvalidArgument(f"{where}: requests.cpu is above limits.cpu, which Kubernetes refuses")
    used = usage.get("memory", limit if limit is not None else requests["memory"])
    if limit is not None and used > limit:
        raise InvalidArgument(
            f"{where}: usage.memory is above limits.memory; the container's own limit would stop it first"
        )
    spec = PodSpec(name, requests["memory"], requests.get("cpu", 0), limit, used)
    return name, count, spec


def parse_workload(data: Any, source: str) -> list[PodSpec]:
    """The pods of a workload document, counts expanded in file order (``web-1``, ``web-2``, ...)."""
    if not isinstance(data, dict) or "pods" not in data:
        raise InvalidArgument(f"{source}: a workload file is a mapping with a `pods:` list")
    unknown = sorted(str(k) for k in data if k != "pods")
    if unknown:
        raise InvalidArgument(f"{source}: unknown top-level key {unknown[0]!r} (only `pods:` is read)")
    entries = data["pods"]
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument(f"{source}: `pods:` must be a non-empty list")
    pods: list[PodSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        name, count, spec = _pod_entry(entry, index, source)
        if name in seen:
            raise InvalidArgument(f"{source}: pods entry {index}: the name {name!r} is used by an earlier entry")
        seen.add(name)
        if len(pods) + count > MAX_PODS:
            raise InvalidArgument(f"{source}: pods entry {index} ({name}): more than {MAX_PODS} pods in all")
        pods.extend(
            PodSpec(f"{name}-{n}", spec.requests_memory, spec.requests_cpu, spec.limits_memory, spec.usage_memory)
            for n in range(1, count + 1)
        )
    return pods


def load_workload(path: Path) -> list[PodSpec]:
    """Read a workload YAML file (see ``examples/overhead/pods.yaml``)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidArgument(f"cannot read the workload file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path} is not YAML: {e}") from None
    return parse_workload(data, str(path))


# --- the packing ----------------------------------------------------------------------------------


def real_overhead(pod: PodSpec, measured: int) -> int:
    """What a VM pod really costs beside its containers: the measured overhead, plus, for a pod whose
    VM is sized from its memory limit, the guest's page structs for that memory (1/64 of it), which
    a measurement on a default-sized VM does not include."""
    return measured + (pod.limits_memory // STRUCT_PAGE_FRACTION if pod.limits_memory else 0)


def _pack(
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
            _pack(s, workload, node_memory_bytes, node_cpu_millicores, real_memory) for s in strategies(measurement)
        ),
        workload=source,
    )


# --- reports ---------------------------------------------------------------------------------------

# Per column: the text table's two header lines, the markdown header, right-aligned or not.
_COLUMNS = (
    ("", "strategy", "strategy", False),
    ("podFixed", "mem/cpu", "podFixed memory/cpu", False),
    ("pods", "admitted", "pods admitted", True),
    ("rejected", "for", "rejected for", False),
    ("declared", "GiB", "memory declared GiB", True),
    ("really", "needed GiB", "memory really needed GiB", True),
    ("need/", "node", "need / node", True),
    ("vs node", "GiB", "over (+) / under (-) node GiB", True),
    ("OOM risk", "node", "OOM risk node-level", True),
    ("OOM risk", "pod", "OOM risk pod-level", True),
    ("OOM risk", "total", "OOM risk total", True),
)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f}"


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / MIB:.1f} MiB"


def _human(num_bytes: int) -> str:
    """GiB for node-sized figures, MiB for pod-sized ones."""
    if num_bytes % GIB == 0:
        return f"{num_bytes // GIB} GiB"
    return f"{num_bytes / GIB:.2f} GiB" if abs(num_bytes) >= GIB else _mib(num_bytes)


def _rows(result: SimulationResult) -> list[list[str]]:
    return [
        [
            r.strategy.name,
            r.strategy.pod_fixed,
            f"{len(r.admitted)}/{result.total_pods}",
            r.rejected_for,
            _gib(r.memory_declared_bytes),
            _gib(r.memory_needed_bytes),
            f"{r.memory_need_ratio:.1%}",
            f"{r.memory_over_bytes / GIB:+.2f}",
            str(len(r.node_oom_risk)),
            str(len(r.pod_oom_risk)),
            str(len(r.at_risk)),
        ]
        for r in result.strategies
    ]


def _setting(result: SimulationResult) -> list[str]:
    """The lines saying what was simulated, shared by the text and markdown reports."""
    workload = f" from {result.workload}" if result.workload else ""
    return [
        f"{result.total_pods} pods{workload} on one node with {format_memory(result.node_memory_bytes)} memory "
        f"and {result.node_cpu_millicores / 1000:g} CPUs ({result.node_cpu_millicores}m), packed first-fit in "
        f"file order by requests plus the declared overhead.",
        f"Real overhead per VM pod on this node (the highest of {result.samples} measured "
        f"sample{'s' if result.samples != 1 else ''}): "
        f"{_mib(result.real_memory_bytes)} memory, {result.real_cpu_millicores:.1f}m CPU.",
    ]


def _strategy_lines(result: SimulationResult) -> list[str]:
    return [f"{r.strategy.name}: podFixed {r.strategy.pod_fixed}, {r.strategy.description}" for r in result.strategies]


def reading(result: SimulationResult) -> str:
    """One paragraph in plain words: who over-admits, whose pods the OOM killer may hit, what fits."""
    node = _human(result.node_memory_bytes)
    sentences: list[str] = []
    for r in result.strategies:
        s = f"With {r.strategy.label}, the scheduler admits {len(r.admitted)} of {result.total_pods} pods"
        if r.rejected:
            s += f" (the rest do not fit the node's {r.rejected_for.replace('+', ' and ').replace('cpu', 'CPU')})"
        gap = _human(abs(r.memory_over_bytes))
        over = "more than" if r.memory_over_bytes > 0 else "less than"
        s += f"; they really need {_human(r.memory_needed_bytes)}, {gap} {over} the node's {node}"
        if r.at_risk:
            reasons = []
            if r.node_oom_risk:
                reasons.append(f"{len(r.node_oom_risk)} because the node runs out of memory")
            if r.pod_oom_risk:
                reasons.append(f"{len(r.pod_oom_risk)} because their pod cgroup has no room for the VMM")
            s += f", and {len(r.at_risk)} are at OOM risk ({', '.join(reasons)})."
        else:
            s += ", and no pod is at OOM risk."
        sentences.append(s)
    over_admit = [r.strategy.label for r in result.strategies if r.memory_over_bytes > 0]
    if over_admit:
        sentences.append(
            f"So with {' or '.join(over_admit)} the scheduler over-admits: its sums fit, the node's memory does not."
        )
    too_small = [r.strategy.label for r in result.strategies if r.pod_oom_risk]
    if too_small:
        sentences.append(
            f"With {' or '.join(too_small)}, less is declared than the {_mib(result.real_memory_bytes)} a VM pod "
            f"really costs, so a memory-limited pod that reaches its limit gets its VMM OOM-killed inside its own "
            f"cgroup."
        )
    for r in result.strategies:
        if r.rejected_by_cpu and not r.rejected_by_memory and r.strategy.cpu_millicores > result.real_cpu_millicores:
            sentences.append(
                f"{r.strategy.label[0].upper()}{r.strategy.label[1:]} asks {format_cpu(r.strategy.cpu_millicores)} "
                f"CPU per pod where a VM pod here idles at {result.real_cpu_millicores:.1f}m, so the node's CPU is "
                f"full after {len(r.admitted)} pods while memory stays unused."
            )
    safe = [r for r in result.strategies if not r.at_risk and r.admitted]
    if safe:
        best = max(safe, key=lambda r: len(r.admitted))
        sentences.append(
            f"The most pods this node holds without OOM risk: {len(best.admitted)}, with {best.strategy.label}."
        )
    else:
        sentences.append("No strategy packs this workload without OOM risk.")
    return " ".join(sentences)


def render_text(result: SimulationResult) -> str:
    """A table for a terminal, with the setting above it and a plain reading below."""
    rows = _rows(result)
    headers = [[c[0] for c in _COLUMNS], [c[1] for c in _COLUMNS]]
    widths = [max(len(line[i]) for line in [*headers, *rows]) for i in range(len(_COLUMNS))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, (_, _, _, right) in zip(cells, widths, _COLUMNS, strict=True)
        ).rstrip()

    out = [*(textwrap.fill(s, width=100) for s in _setting(result)), ""]
    out += [line(headers[0]), line(headers[1]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out += ["", *(textwrap.fill(s, width=100, subsequent_indent="  ") for s in _strategy_lines(result))]
    out += ["", textwrap.fill(reading(result), width=100)]
    return "\n".join(out) + "\n"


def render_markdown(result: SimulationResult) -> str:
    """The same report as a markdown document, with the chart next to it (simulation.png)."""
    header = [c[2] for c in _COLUMNS]
    align = ["---:" if c[3] else "---" for c in _COLUMNS]
    out = ["# Pod overhead: scheduling simulation", ""]
    for paragraph in _setting(result):
        out += [paragraph, ""]
    out += ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    out += ["", *(f"- {s}" for s in _strategy_lines(result)), "", reading(result), "", "![chart](simulation.png)"]
    return "\n".join(out) + "\n"


def render_png(result: SimulationResult, path: Path) -> None:
    """Grouped bars per strategy (memory declared, really needed) against the node's memory.

    The file is byte-for-byte the same for the same result: fixed size and dpi, matplotlib's
    default style whatever the user's matplotlibrc says, and no version stamp in the metadata.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r.strategy.name for r in result.strategies]
    declared = [r.memory_declared_bytes / GIB for r in result.strategies]
    needed = [r.memory_needed_bytes / GIB for r in result.strategies]
    node = result.node_memory_bytes / GIB
    top = max([node, *declared, *needed])
    width = 0.38
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        fig = Figure(figsize=(8.0, 5.0), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        xs = list(range(len(names)))
        ax.bar([x - width / 2 for x in xs], declared, width, color="#4c72b0", label="declared: requests + podFixed")
        ax.bar(
            [x + width / 2 for x in xs], needed, width, color="#dd8452", label="really needed: usage + real overhead"
        )
        ax.axhline(node, color="#c44e52", linestyle="--", linewidth=1.5, label=f"node memory ({node:g} GiB)")
        for x, r in zip(xs, result.strategies, strict=True):
            ax.text(
                x,
                max(declared[x], needed[x], node) + top * 0.03,
                f"admitted {len(r.admitted)}/{result.total_pods}\nat OOM risk {len(r.at_risk)}\n"
                f"(node {len(r.node_oom_risk)}, pod {len(r.pod_oom_risk)})",
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.set_xticks(xs, [f"{r.strategy.name}\npodFixed {r.strategy.pod_fixed}" for r in result.strategies])
        ax.set_ylabel("memory (GiB)")
        ax.set_ylim(0, top * 1.3)
        ax.set_title(
            f"{result.total_pods} pods on {format_memory(result.node_memory_bytes)}, "
            f"{result.node_cpu_millicores / 1000:g} CPUs; a VM pod really costs {_mib(result.real_memory_bytes)}",
            fontsize=10,
        )
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
        fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


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

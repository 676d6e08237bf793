"""The scheduling simulation's reports: a table with a plain reading for the terminal, the same as
markdown, and a bar chart as PNG that is byte-for-byte the same for the same result."""

from __future__ import annotations

import textwrap
from pathlib import Path

from kvmsandbox.overhead.packing import SimulationResult
from kvmsandbox.overhead.quantity import format_cpu, format_memory

MIB = 1024 * 1024
GIB = 1024 * MIB

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

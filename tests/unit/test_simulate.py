"""The scheduling simulation: workload files, the packing arithmetic, the reports."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.overhead.model import Measurement, Sample
from kvmsandbox.overhead.packing import SimulationResult, StrategyResult
from kvmsandbox.overhead.simulate import KATA_QEMU_CPU_MILLICORES, KATA_QEMU_MEMORY_BYTES, run_simulation, simulate
from kvmsandbox.overhead.simulation_report import render_markdown, render_text
from kvmsandbox.overhead.workload import PodSpec, load_workload

MI = 1024**2
GI = 1024**3
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "overhead" / "pods.yaml"


def measurement(memory_mib: int, cpu_millicores: float, margin_percent: float) -> Measurement:
    """One sample whose overhead components add up to the given totals."""
    memory = memory_mib * MI
    return Measurement(
        samples=[
            Sample(
                memory={
                    "guest_kernel_reserved": memory // 4,
                    "guest_idle_used": memory // 4,
                    "vmm_beyond_guest_ram": memory - 3 * (memory // 4),
                    "runtime_share": memory // 4,
                },
                cpu={"vmm_idle": cpu_millicores * 0.75, "runtime_idle": cpu_millicores * 0.25},
            )
        ],
        margin_percent=margin_percent,
        conditions={},
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pods.yaml"
    path.write_text(text)
    return path


def by_name(result: SimulationResult) -> dict[str, StrategyResult]:
    return {r.strategy.name: r for r in result.strategies}


# --- workload file -----------------------------------------------------------------------------------


def test_load_workload_expands_counts_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
pods:
  - name: web
    count: 2
    requests: {memory: 256Mi, cpu: 100m}
    limits: {memory: 512Mi, cpu: 1}
  - name: worker
    requests: {memory: 1Gi}
    usage: {memory: 900Mi}
  - name: bytes
    requests: {memory: 1048576, cpu: 0.5}
""",
    )
    assert load_workload(path) == [
        PodSpec("web-1", 256 * MI, 100, 512 * MI, 512 * MI),  # usage defaults to the memory limit
        PodSpec("web-2", 256 * MI, 100, 512 * MI, 512 * MI),
        PodSpec("worker-1", GI, 0, None, 900 * MI),
        PodSpec("bytes-1", MI, 500, None, MI),  # ... else to the request; YAML numbers are bytes and cores
    ]


def test_the_example_workload_loads() -> None:
    pods = load_workload(EXAMPLE)
    assert len(pods) > 20
    assert len({p.name for p in pods}) == len(pods)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pods: []", r"`pods:` must be a non-empty list"),
        ("[1, 2]", r"a mapping with a `pods:` list"),
        ("", r"a mapping with a `pods:` list"),
        ("pods: [1]", r"pods entry 1 must be a mapping"),
        ("pods:\n  - requests: {memory: 1Gi}", r"pods entry 1 has no name"),
        ("pods:\n  - name: web", r"pods entry 1 \(web\) has no requests"),
        ("pods:\n  - name: web\n    requests: {cpu: 1}", r"pods entry 1 \(web\) has no requests\.memory"),
        ("pods:\n  - name: web\n    requests: 1Gi", r"\(web\): requests must be a mapping"),
        (
            "pods:\n  - name: web\n    requests: {memory: 256MB}",
            r"pods entry 1 \(web\): requests\.memory: '256MB' is not a Kubernetes memory quantity",
        ),
        ("pods:\n  - name: web\n    requests: {memory: 1Gi, cpu: 2Gi}", r"\(web\): requests\.cpu: '2Gi' is not a CPU"),
        ("pods:\n  - name: web\n    requests: {memory: -1Gi}", r"requests\.memory: '-1Gi' is negative"),
        ("pods:\n  - name: web\n    requests: {memory: 1Gi}\n    replicas: 3", r"\(web\): unknown key 'replicas'"),
        ("pods:\n  - name: web\n    requests: {memory: 1Gi, storage: 1Gi}", r"unknown key requests\.storage"),
        ("pods:\n  - name: web\n    requests: {memory: 1Gi}\n    usage: {cpu: 1}", r"unknown key usage\.cpu"),
        ("pods:\n  - name: web\n    requests: {memory: 1Gi}\nnodes: 3", r"unknown top-level key 'nodes'"),
        ("pods:\n  - name: web\n    count: 0\n    requests: {memory: 1Gi}", r"\(web\): count must be .* not 0"),
        ("pods:\n  - name: web\n    count: -2\n    requests: {memory: 1Gi}", r"count must be .* not -2"),
        ("pods:\n  - name: web\n    count: '3'\n    requests: {memory: 1Gi}", r"count must be .* not '3'"),
        ("pods:\n  - name: web\n    count: true\n    requests: {memory: 1Gi}", r"count must be .* not True"),
        ("pods:\n  - name: web\n    count: 20000\n    requests: {memory: 1Gi}", r"more than 10000 pods"),
        (
            "pods:\n  - name: web\n    requests: {memory: 1Gi}\n    limits: {memory: 512Mi}",
            r"requests\.memory is above limits\.memory",
        ),
        (
            "pods:\n  - name: web\n    requests: {memory: 1Gi, cpu: 2}\n    limits: {cpu: 1}",
            r"requests\.cpu is above limits\.cpu",
        ),
        (
            "pods:\n  - name: web\n    requests: {memory: 1Gi}\n    limits: {memory: 1Gi}\n    usage: {memory: 2Gi}",
            r"usage\.memory is above limits\.memory",
        ),
        (
            "pods:\n  - name: web\n    requests: {memory: 1Gi}\n  - name: web\n    requests: {memory: 1Gi}",
            r"pods entry 2: the name 'web' is used by an earlier entry",
        ),
        ("pods: [", r"is not YAML"),
    ],
)
def test_load_workload_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument, match=message) as caught:
        load_workload(path)
    assert str(path) in str(caught.value)


def test_missing_workload_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"cannot read the workload file .*nope\.yaml"):
        load_workload(tmp_path / "nope.yaml")


# --- packing -----------------------------------------------------------------------------------------

TINY = """
pods:
  - name: app
    count: 4
    requests: {memory: 256Mi, cpu: 100m}
    limits: {memory: 256Mi}
  - name: tiny
    requests: {memory: 32Mi, cpu: 10m}
"""


def test_packing_by_hand(tmp_path: Path) -> None:
    """Node 1Gi (1024Mi) and 4000m; real overhead 200Mi/20m; margin 50% so measured declares 300Mi/30m.

    Pods: app-1..4 request 256Mi/100m with a 256Mi limit (usage = limit = 256Mi), then tiny-1
    requests 32Mi/10m, no limit (usage 32Mi). Real overhead: 200Mi, plus 256/64 = 4Mi of guest page
    structs for the apps, whose VMs are sized from their limits. Real need: app 460Mi, tiny 232Mi.

    none (0/0): apps declare 256 each -> 1024 = node, all 4 in; tiny 1024+32 > 1024, out.
      real need 460, 920, 1380 > 1024 at app-3 -> node-level: app-3, app-4 (2).
      pod-level: every app, 256+0 < 256+204 (4). union 4. declared 1024Mi, needed 1840Mi.
    kata (160Mi/250m): apps declare 416: 416, 832, 1248 > 1024 -> app-3, app-4 out (memory);
      tiny 32+160 = 192: 832+192 = 1024 = node, in. cpu 350+350+260 = 960.
      real need 460, 920, 920+232 = 1152 > 1024 at tiny-1 -> node-level: tiny-1 (1).
      pod-level: app-1, app-2, 160 < 204 (2); tiny has no limit. union 3. declared 1024Mi, needed 1152Mi.
    measured (300Mi/30m): apps declare 556: 556, then 1112 > 1024 -> app-2..4 out;
      tiny 332: 556+332 = 888, in. real need 460+232 = 692. no risk (300 >= 204). declared 888Mi.
    """
    m = measurement(200, 20.0, 50.0)
    assert (m.observed_memory_bytes, m.observed_cpu_millicores) == (200 * MI, 20.0)
    assert (m.recommended_memory_bytes, m.recommended_cpu_millicores) == (300 * MI, 30)
    result = simulate(load_workload(write(tmp_path, TINY)), GI, 4000, m)
    r = by_name(result)
    assert [s.strategy.name for s in result.strategies] == ["none", "kata", "measured"]
    assert (r["kata"].strategy.memory_bytes, r["kata"].strategy.cpu_millicores) == (160 * MI, 250)

    none = r["none"]
    assert none.admitted == ("app-1", "app-2", "app-3", "app-4")
    assert none.rejected == ("tiny-1",)
    assert (none.rejected_by_memory, none.rejected_by_cpu) == (1, 0)
    assert (none.memory_declared_bytes, none.cpu_declared_millicores) == (1024 * MI, 400)
    assert none.memory_needed_bytes == 1840 * MI
    assert none.memory_over_bytes == 816 * MI
    assert none.memory_need_ratio == pytest.approx(1840 / 1024)
    assert none.node_oom_risk == ("app-3", "app-4")
    assert none.pod_oom_risk == ("app-1", "app-2", "app-3", "app-4")
    assert none.at_risk == ("app-1", "app-2", "app-3", "app-4")

    kata = r["kata"]
    assert kata.admitted == ("app-1", "app-2", "tiny-1")
    assert kata.rejected == ("app-3", "app-4")
    assert (kata.rejected_by_memory, kata.rejected_by_cpu) == (2, 0)
    assert (kata.memory_declared_bytes, kata.cpu_declared_millicores) == (1024 * MI, 960)
    assert kata.memory_needed_bytes == 1152 * MI
    assert kata.node_oom_risk == ("tiny-1",)
    assert kata.pod_oom_risk == ("app-1", "app-2")
    assert kata.at_risk == ("app-1", "app-2", "tiny-1")

    measured = r["measured"]
    assert measured.admitted == ("app-1", "tiny-1")
    assert measured.rejected == ("app-2", "app-3", "app-4")
    assert (measured.memory_declared_bytes, measured.cpu_declared_millicores) == (888 * MI, 170)
    assert measured.memory_needed_bytes == 692 * MI
    assert measured.memory_over_bytes == -332 * MI
    assert measured.node_oom_risk == measured.pod_oom_risk == measured.at_risk == ()


def test_cpu_can_be_what_fills_the_node(tmp_path: Path) -> None:
    """Node 1Gi and 500m, same pods. kata: app-1 takes 350m; every later pod needs 260m or more on
    top (app 350m, tiny 260m): 610m > 500m, so all four are rejected by CPU alone (memory would fit:
    416+416 = 832Mi, 416+192 = 608Mi)."""
    result = simulate(load_workload(write(tmp_path, TINY)), GI, 500, measurement(200, 20.0, 50.0))
    kata = by_name(result)["kata"]
    assert kata.admitted == ("app-1",)
    assert (kata.rejected_by_memory, kata.rejected_by_cpu) == (0, 4)
    assert kata.rejected_for == "cpu"


def test_simulate_refuses_an_empty_node() -> None:
    with pytest.raises(InvalidArgument, match="node needs some memory"):
        simulate([PodSpec("a-1", MI, 1, None, MI)], 0, 1000, measurement(200, 20.0, 10.0))


def random_workload(rng: random.Random) -> list[PodSpec]:
    """Pods that use no more than they request (so the node-level risk can only come from overhead)."""
    pods = []
    for i in range(rng.randint(1, 80)):
        request = rng.randint(16, 3072) * MI
        limit = rng.choice([None, request, request * 2])
        pods.append(PodSpec(f"p-{i}", request, rng.randint(0, 200), limit, rng.randint(0, request)))
    return pods


def test_measured_puts_pods_at_risk_only_where_the_margin_misses_their_page_structs() -> None:
    """Pod-level: a limited pod's real overhead is the measured one plus 1/64 of its limit (its VM
    is sized from the limit); the measured podFixed covers it exactly where its margin does. When
    it covers every pod, node-level too: with usage within requests, what the scheduler counted
    (requests + podFixed) bounds the real need, which it kept under the node."""
    rng = random.Random(20260101)
    covered = uncovered = 0
    for _ in range(300):
        m = measurement(rng.randint(20, 600), rng.uniform(1.0, 300.0), rng.choice([0.0, 5.0, 10.0, 33.3]))
        workload = random_workload(rng)
        result = simulate(workload, rng.randint(1, 64) * GI, rng.randint(1, 16) * 1000, m)
        measured = by_name(result)["measured"]
        margin = m.recommended_memory_bytes - m.observed_memory_bytes
        short = {p.name for p in workload if p.limits_memory and p.limits_memory // 64 > margin}
        assert set(measured.pod_oom_risk) == short & set(measured.admitted)
        if not short:
            covered += 1
            assert measured.at_risk == ()
            assert measured.memory_needed_bytes <= result.node_memory_bytes
        else:
            uncovered += 1
    assert covered > 20 and uncovered > 20


def test_kata_constants() -> None:
    assert (KATA_QEMU_MEMORY_BYTES, KATA_QEMU_CPU_MILLICORES) == (160 * MI, 250)


# --- reports -----------------------------------------------------------------------------------------


def example_measurement() -> Measurement:
    return measurement(200, 30.0, 10.0)


def test_run_simulation_is_deterministic(tmp_path: Path) -> None:
    results = [run_simulation("24Gi", "2", EXAMPLE, example_measurement(), tmp_path / d) for d in ("a", "b")]
    a, b = tmp_path / "a", tmp_path / "b"
    assert results[0] == results[1]
    assert render_text(results[0]) == render_text(results[1])
    assert (a / "simulation.md").read_text() == (b / "simulation.md").read_text()
    png = (a / "simulation.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png == (b / "simulation.png").read_bytes()
    assert b"matplotlib" not in png  # no version stamp in the metadata


def test_run_simulation_creates_the_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "er"
    run_simulation("24Gi", "2", EXAMPLE, example_measurement(), out)
    assert sorted(p.name for p in out.iterdir()) == ["simulation.md", "simulation.png"]


def test_the_example_shows_the_difference() -> None:
    """On 24Gi/2 CPUs with a 200Mi/30m pod: none over-admits, kata leaves pod cgroups too small, measured fits."""
    result = simulate(load_workload(EXAMPLE), 24 * GI, 2000, example_measurement(), source="pods.yaml")
    r = by_name(result)
    assert r["none"].memory_over_bytes > 0 and r["none"].node_oom_risk
    assert r["kata"].pod_oom_risk and not r["kata"].node_oom_risk
    assert r["measured"].at_risk == () and r["measured"].rejected_for == "memory"
    assert len(r["measured"].admitted) < len(r["none"].admitted)


def test_reports_carry_the_figures() -> None:
    result = simulate(load_workload(EXAMPLE), 24 * GI, 2000, example_measurement(), source="pods.yaml")
    text = render_text(result)
    markdown = render_markdown(result)
    for report in (" ".join(text.split()), markdown):  # the text report is wrapped at 100 columns
        assert "200.0 MiB memory, 30.0m CPU" in report  # the real overhead per pod
        assert "160Mi/250m" in report and "0/0" in report  # each strategy's podFixed
        assert f"{result.strategies[2].strategy.pod_fixed}" in report
        assert "over-admits" in report
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "![chart](simulation.png)" in markdown


def test_run_simulation_names_the_bad_flag(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"--node-memory: '24GB'"):
        run_simulation("24GB", "2", EXAMPLE, example_measurement(), tmp_path)
    with pytest.raises(InvalidArgument, match=r"--node-cpu: '2Gi'"):
        run_simulation("24Gi", "2Gi", EXAMPLE, example_measurement(), tmp_path)
    with pytest.raises(InvalidArgument, match=r"--node-cpu '0'"):
        run_simulation("24Gi", "0", EXAMPLE, example_measurement(), tmp_path)
    assert not (tmp_path / "simulation.md").exists()

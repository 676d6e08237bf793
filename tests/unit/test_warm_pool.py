"""The warm pool's bookkeeping: which waiting clone a pod gets, which go back, and when the filler
adds or gives back clones."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmsandbox.config import Config, TemplateConfig
from kvmsandbox.hypervisor.spec import VMInfo
from kvmsandbox.hypervisor.template_store import TemplateUnusable
from kvmsandbox.sandbox import warm_pool
from kvmsandbox.sandbox.warm_pool import WarmPool, WarmVM


class FakeTemplates:
    def __init__(self) -> None:
        self.generation = "g1"

    def memory_class(self, memory_mib: int) -> int:
        return 256

    def current_key(self, vcpus: int, memory_mib: int) -> str:
        if not self.generation:
            raise TemplateUnusable("no image")
        return f"{self.generation}-{vcpus}-{memory_mib}"


class FakeHypervisor:
    def __init__(self) -> None:
        self.running = {"kvsb-warm-a1", "kvsb-warm-c3", "kvsb-warm-d4"}

    def info(self, name: str) -> VMInfo | None:
        return VMInfo(name, 1, True) if name in self.running else None


def make_pool(tmp_path: Path) -> tuple[WarmPool, FakeTemplates, FakeHypervisor, list[str]]:
    config = Config(state_dir=tmp_path, run_dir=tmp_path / "run", templates=TemplateConfig(warm_pool=3))
    templates, hypervisor = FakeTemplates(), FakeHypervisor()
    p = WarmPool(SimpleNamespace(config=config, hypervisor=hypervisor), templates)  # type: ignore[arg-type]
    removed: list[str] = []
    p._remove = removed.append  # type: ignore[method-assign]
    return p, templates, hypervisor, removed


def test_a_pod_of_the_pools_size_takes_a_running_clone_of_todays_template(tmp_path: Path) -> None:
    p, _, _, removed = make_pool(tmp_path)
    p._ready = [WarmVM("a1", "g0-1-256", 1, 256, 11), WarmVM("b2", "g1-1-256", 1, 256, 12)]
    p._ready.append(WarmVM("c3", "g1-1-256", 1, 256, 13))
    vm = p.take(1, 256)
    # a1 is of yesterday's template, b2's QEMU is gone: both go to the filler, not to the pod.
    assert vm is not None and vm.id == "c3"
    assert [v.id for v in p._stale] == ["a1", "b2"] and p._ready == [] and removed == []
    p._destroy_stale()
    assert removed == ["a1", "b2"]


def test_a_pod_of_another_size_leaves_the_pool_alone(tmp_path: Path) -> None:
    p, templates, _, _ = make_pool(tmp_path)
    p._ready = [WarmVM("d4", "g1-1-256", 1, 256, 14)]
    assert p.take(2, 256) is None and p.take(1, 512) is None
    templates.generation = ""
    assert p.take(1, 256) is None
    assert [v.id for v in p._ready] == ["d4"] and p._stale == []


def test_the_filler_gives_clones_back_below_the_floor_and_adds_only_well_above(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p, _, _, _ = make_pool(tmp_path)
    events: list[str] = []
    floor = p.min_available

    def step(available: int) -> None:
        monkeypatch.setattr(warm_pool.proc, "mem_available", lambda: available)
        p._stop.clear()

        def record(what: str) -> None:
            events.append(what)
            p._stop.set()

        p._give_back_one = lambda: record("give back")  # type: ignore[method-assign]
        p._add_one = lambda: record("add")  # type: ignore[method-assign]
        p._wake.set()
        monkeypatch.setattr(warm_pool, "POLL_SECONDS", 0.01)
        p._fill()

    step(floor - 1)
    step(floor + (p.memory_mib << 20))
    assert events == ["give back", "add"]
    # Between the floor and a clone's worth above it: neither (no swing).
    p._stop.clear()
    monkeypatch.setattr(warm_pool.proc, "mem_available", lambda: floor + 1)
    p._give_back_one = lambda: events.append("give back")  # type: ignore[method-assign]
    p._add_one = lambda: events.append("add")  # type: ignore[method-assign]
    import threading

    threading.Timer(0.2, p._stop.set).start()
    p._fill()
    assert events == ["give back", "add"]


def test_the_pool_has_the_default_size_and_its_own_names(tmp_path: Path) -> None:
    p, _, _, _ = make_pool(tmp_path)
    assert (p.vcpus, p.memory_mib, p.size) == (1, 256, 3)
    vm = WarmVM("0123456789ab", "k1", 1, 256, 1)
    assert vm.name == "kvsb-warm-0123456789ab" and len(vm.tap) <= 15
    assert p.run_dir(vm.id).name == "w-0123456789ab"


def test_a_huge_pool_is_a_config_error() -> None:
    from kvmsandbox.config import ConfigError

    with pytest.raises(ConfigError, match="warm_pool"):
        TemplateConfig(warm_pool=65)

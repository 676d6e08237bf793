"""Overhead measured on real guests: every figure positive and plausible, the VMM accounted in
its host cgroup, and the cgroup gone with the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsandbox.host import proc as host
from kvmsandbox.host.cgroups import HostCgroup
from kvmsandbox.overhead import measure
from kvmsandbox.overhead.model import CPU_COMPONENTS, MEMORY_COMPONENTS
from kvmsandbox.overhead.report import render_measurement
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.records import SandboxRecord

pytestmark = pytest.mark.vm
MIB = 1024 * 1024


def test_a_measured_pod_has_plausible_figures_for_every_component(manager: SandboxManager, busybox_layer: Path) -> None:
    progress: list[str] = []
    m = measure.measure_node(
        manager, busybox_layer, 1, margin_percent=10.0, idle_seconds=3.0, settle_seconds=1.0, progress=progress.append
    )
    (s,) = m.samples
    assert 1 * MIB <= s.memory["guest_kernel_reserved"] <= 512 * MIB
    assert 1 * MIB <= s.memory["guest_idle_used"] <= 512 * MIB
    assert 1 * MIB <= s.memory["agent_rss"] <= 200 * MIB
    assert s.memory["agent_rss"] <= s.memory["guest_idle_used"]
    assert 1 * MIB <= s.memory["vmm_beyond_guest_ram"] <= 1024 * MIB
    assert s.memory["vmm_guest_ram_touched"] > s.memory["guest_idle_used"] / 2
    assert s.memory["runtime_share"] >= 0
    assert 0 < s.cpu["vmm_idle"] < 1000 * manager.config.sandbox.vcpus
    # Both from guest clocks with 10 ms resolution over a 3 s window.
    assert 0 <= s.cpu["agent_idle"] <= s.cpu["guest_idle"] + 10
    assert s.cpu["vmm_container_start"] > s.cpu["vmm_idle"]
    if manager.accel == "tcg":
        assert s.memory["vmm_tcg_cache"] > 0
    assert set(MEMORY_COMPONENTS) <= set(s.memory) and set(CPU_COMPONENTS) <= set(s.cpu)
    assert m.recommended_memory_bytes >= m.observed_memory_bytes * 1.1 - MIB
    assert m.recommended_cpu_millicores >= m.observed_cpu_millicores
    assert any("booting sandbox 1/1" in p for p in progress) and any("removing" in p for p in progress)
    text = render_measurement(m)
    assert "Recommended podFixed: memory" in text and "guest kernel reservation" in text
    # Nothing of the measured sandbox stays.
    assert manager.list_sandboxes() == [r for r in manager.list_sandboxes() if r.hostname != "overhead-1"]


def test_the_vmm_runs_in_the_sandboxs_host_cgroup_and_boot_figures_are_kept(
    manager: SandboxManager, sandbox: SandboxRecord
) -> None:
    record = manager.get_sandbox(sandbox.id)
    assert record.cgroup.endswith(f"/kvmsandbox-{sandbox.id[:16]}")
    pid = measure.vmm_pid(manager, record)
    assert pid in HostCgroup(record.cgroup).pids()
    usage = manager.vm_usage(record.id)
    vmm = host.vmm_memory(pid, record.memory_mib * MIB)
    # The VMM joined its cgroup before it ran the guest: every guest page it touched is charged
    # there (only file pages it shares with other VMMs, like the kernel image, may be charged to
    # whoever read them first).
    assert usage.memory_working_set_bytes >= vmm.guest_ram_rss > 16 * MIB
    assert usage.memory_working_set_bytes <= vmm.rss + 16 * MIB
    assert usage.cpu_usage_ns > 0
    at_boot = record.overhead_at_boot
    assert at_boot["guest_kernel_reserved"] > MIB and at_boot["guest_idle_used"] > MIB
    assert at_boot["vmm_beyond_guest_ram"] > MIB


def test_removing_a_sandbox_removes_its_cgroup(manager: SandboxManager) -> None:
    record = manager.create_sandbox(hostname="cgroup-check")
    cg = HostCgroup(record.cgroup)
    assert cg.exists()
    manager.destroy_sandbox(record.id)
    assert not cg.exists()


def test_clones_are_measured_at_their_share_of_the_templates_pages(
    manager: SandboxManager, busybox_layer: Path
) -> None:
    if not manager.templates.supported:
        pytest.skip("the libvirt backend has no VM templates")
    m = measure.measure_node(
        manager, busybox_layer, 3, margin_percent=10.0, idle_seconds=2.0, settle_seconds=1.0, from_template=True
    )
    assert m.conditions["template"] and m.conditions["template_memory_bytes"] > 32 * MIB
    for s in m.samples:
        guest = s.memory["guest_kernel_reserved"] + s.memory["guest_idle_used"]
        # The guest's cost on the host is its RAM's PSS, never more than its own figures.
        assert 0 < s.memory["vmm_guest_ram_pss"] < s.memory["vmm_guest_ram_touched"]
        assert s.memory["template_shared"] == -max(0, guest - s.memory["vmm_guest_ram_pss"])
    # Three clones share their template's pages: at least one costs less than its guest's figures.
    assert min(s.memory["template_shared"] for s in m.samples) < 0
    assert "guest pages shared with other clones" in render_measurement(m)
    assert manager.list_sandboxes() == [r for r in manager.list_sandboxes() if not r.hostname.startswith("overhead-")]

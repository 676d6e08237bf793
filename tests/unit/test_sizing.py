"""VM sizing from pod limits and the declared-versus-measured overhead check."""

from __future__ import annotations

from kvmsandbox.overhead.sizing import PodResources, check_declared, size_vm

MIB = 1024 * 1024
DEFAULTS = {"default_vcpus": 1, "default_memory_mib": 256, "min_memory_mib": 128, "max_vcpus": 2}


def test_no_limits_gives_the_configured_defaults() -> None:
    size = size_vm(PodResources(), guest_memory_bytes=90 * MIB, **DEFAULTS)
    assert (size.vcpus, size.memory_mib) == (1, 256)
    assert "default" in size.reason


def test_memory_is_limits_plus_guest_need_plus_page_structs_in_2mib_steps() -> None:
    # 512 MiB of limits + 90 MiB for the guest + 512/64 = 8 MiB of struct pages = 610 MiB.
    size = size_vm(PodResources(memory_limit_in_bytes=512 * MIB), guest_memory_bytes=90 * MIB, **DEFAULTS)
    assert size.memory_mib == 610
    # 100 MiB + 90.5 MiB + 1.5625 MiB = 192.06 MiB -> rounded up to 194 MiB.
    size = size_vm(PodResources(memory_limit_in_bytes=100 * MIB), guest_memory_bytes=90 * MIB + 512 * 1024, **DEFAULTS)
    assert size.memory_mib == 194


def test_small_limits_get_the_floor() -> None:
    size = size_vm(PodResources(memory_limit_in_bytes=8 * MIB), guest_memory_bytes=20 * MIB, **DEFAULTS)
    assert size.memory_mib == 128


def test_vcpus_round_the_cpu_limit_up_and_are_capped() -> None:
    def vcpus(quota: int) -> int:
        return size_vm(PodResources(cpu_period=100_000, cpu_quota=quota), guest_memory_bytes=0, **DEFAULTS).vcpus

    assert vcpus(50_000) == 1
    assert vcpus(100_000) == 1
    assert vcpus(150_000) == 2
    capped = size_vm(PodResources(cpu_period=100_000, cpu_quota=800_000), guest_memory_bytes=0, **DEFAULTS)
    assert capped.vcpus == 2 and "capped at 2" in capped.reason


def test_declared_cpu_comes_from_quota_or_shares() -> None:
    assert PodResources(cpu_period=100_000, cpu_quota=25_000).cpu_millicores == 250
    assert PodResources(cpu_shares=256).cpu_millicores == 250
    # The kubelet's minimum of 2 shares means nothing was asked for.
    assert PodResources(cpu_shares=2).cpu_millicores == 0


def test_declared_below_measured_warns_and_names_both_figures() -> None:
    declared = PodResources(memory_limit_in_bytes=160 * MIB, cpu_period=100_000, cpu_quota=25_000)
    check = check_declared(declared, 200 * MIB, 30.0)
    assert "memory 160 MiB is below the measured 200 MiB" in check.warning
    assert "cpu" not in check.warning.split("podFixed")[1].split(".")[0]  # 250m covers 30m
    check = check_declared(declared, 100 * MIB, 300.0)
    assert "cpu 250m is below the measured 300m" in check.warning
    assert "memory" not in check.warning.split(":", 1)[1].split(".")[0]


def test_nothing_declared_warns_and_enough_declared_does_not() -> None:
    assert "no memory overhead is declared" in check_declared(PodResources(), 64 * MIB, 0.0).warning
    assert check_declared(PodResources(memory_limit_in_bytes=64 * MIB), 64 * MIB, 0.0).warning == ""
    # Unmeasured CPU (0) is not compared.
    assert check_declared(PodResources(memory_limit_in_bytes=64 * MIB), 10 * MIB, 0.0).warning == ""

"""detect_accel() against fake /proc and /dev files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsandbox.hypervisor.accel import detect_accel

INTEL_FLAGS = "fpu vme de pse tsc msr pae vmx sse sse2"
NESTED_FLAGS = "fpu vme de pse tsc msr pae hypervisor sse sse2"


class FakeHost:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cpuinfo = root / "cpuinfo"
        self.dev_kvm = root / "kvm"
        self.proc_modules = root / "modules"
        self.sys_module = root / "sys-module"
        self.sys_module.mkdir()

    def set_flags(self, flags: str, cpus: int = 2) -> None:
        self.cpuinfo.write_text(
            "".join(f"processor\t: {n}\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\n" for n in range(cpus))
        )

    def detect(self) -> tuple[str, str]:
        return detect_accel(
            cpuinfo=self.cpuinfo,
            dev_kvm=self.dev_kvm,
            proc_modules=self.proc_modules,
            sys_module=self.sys_module,
        )


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    h = FakeHost(tmp_path)
    h.set_flags(INTEL_FLAGS)
    h.dev_kvm.write_text("")
    h.proc_modules.write_text("kvm_intel 368640 0 - Live 0x0000000000000000\nkvm 1138688 1 kvm_intel, Live 0x0\n")
    return h


def test_kvm_is_chosen_with_a_usable_dev_kvm_and_vmx(host: FakeHost) -> None:
    accel, reason = host.detect()
    assert accel == "kvm"
    assert "vmx" in reason


def test_svm_counts_as_hardware_virtualisation(host: FakeHost) -> None:
    host.set_flags("fpu svm sse")
    assert host.detect()[0] == "kvm"


def test_missing_dev_kvm_means_tcg(host: FakeHost) -> None:
    host.dev_kvm.unlink()
    accel, reason = host.detect()
    assert accel == "tcg"
    assert str(host.dev_kvm) in reason


def test_dev_kvm_without_vmx_or_svm_means_tcg(host: FakeHost) -> None:
    host.set_flags(NESTED_FLAGS)
    accel, reason = host.detect()
    assert accel == "tcg"
    assert "neither vmx nor svm" in reason


def test_a_flag_that_merely_contains_vmx_does_not_count(host: FakeHost) -> None:
    host.set_flags("fpu vmx_ept_1gb sse")
    assert host.detect()[0] == "tcg"


def test_loaded_kvm_pvm_module_means_tcg(host: FakeHost) -> None:
    host.proc_modules.write_text("kvm_pvm 200704 0 - Live 0x0\nkvm 1138688 1 kvm_pvm, Live 0x0\n")
    accel, reason = host.detect()
    assert accel == "tcg"
    assert "kvm_pvm" in reason


def test_built_in_kvm_pvm_is_found_without_proc_modules(host: FakeHost) -> None:
    host.proc_modules.unlink()
    (host.sys_module / "kvm_pvm").mkdir()
    assert host.detect()[0] == "tcg"


def test_unreadable_cpuinfo_means_tcg(host: FakeHost) -> None:
    host.cpuinfo.unlink()
    assert host.detect()[0] == "tcg"


def test_this_host_gets_an_answer_with_a_reason() -> None:
    accel, reason = detect_accel()
    assert accel in ("kvm", "tcg")
    assert reason

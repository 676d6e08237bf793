"""Which accelerator QEMU should use on this host: KVM when it really works, TCG otherwise.

A `/dev/kvm` that opens is not enough: under kvm_pvm (pagetable-based nested virtualisation) the device
exists and opens, but a stock guest kernel started with `-accel kvm` spins forever. Real hardware
virtualisation shows as the `vmx` (Intel) or `svm` (AMD) CPU flag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]

HW_VIRT_FLAGS = frozenset({"vmx", "svm"})
PVM_MODULE = "kvm_pvm"


def detect_accel(
    *,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    dev_kvm: Path = Path("/dev/kvm"),
    proc_modules: Path = Path("/proc/modules"),
    sys_module: Path = Path("/sys/module"),
) -> tuple[Accel, str]:
    """Decide between KVM and TCG and say why in one sentence.

    KVM is chosen only if `dev_kvm` opens read-write, the CPU flags in `cpuinfo` include vmx or svm,
    and kvm_pvm is neither a loaded module (`proc_modules`) nor built in (`sys_module`; some hosts
    have no /proc/modules at all). The paths are parameters so tests can point them at fixtures.

    Raises nothing: an unreadable file counts as "feature absent".
    """
    if not _opens_read_write(dev_kvm):
        return "tcg", f"{dev_kvm} is missing or not read-write, so guests run under TCG (slow)"
    flags = _cpu_flags(cpuinfo)
    if not flags & HW_VIRT_FLAGS:
        return "tcg", (
            f"{dev_kvm} opens but the CPU flags have neither vmx nor svm (nested or paravirtual KVM), "
            "so guests run under TCG (slow)"
        )
    if _pvm_loaded(proc_modules, sys_module):
        return "tcg", (
            f"{dev_kvm} is provided by {PVM_MODULE}, which stock guest kernels cannot use, "
            "so guests run under TCG (slow)"
        )
    found = "/".join(sorted(flags & HW_VIRT_FLAGS))
    return "kvm", f"{dev_kvm} is read-write and the CPU has {found}: guests run under KVM"


def _opens_read_write(path: Path) -> bool:
    # os.access alone would say yes for root even where the open fails (e.g. device cgroup rules).
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags.update(value.split())
    return flags


def _pvm_loaded(proc_modules: Path, sys_module: Path) -> bool:
    if (sys_module / PVM_MODULE).exists():
        return True
    try:
        text = proc_modules.read_text()
    except OSError:
        return False
    return any(line.split(" ", 1)[0] == PVM_MODULE for line in text.splitlines())

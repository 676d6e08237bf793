"""The qemu backend runs the QEMU it is configured with, and says so when that QEMU is missing.
QEMU itself is replaced by a stand-in that records its command line: no VM boots here."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor.factory import open_hypervisor
from kvmsandbox.hypervisor.qemu_backend import QemuHypervisor
from kvmsandbox.hypervisor.spec import AgentChannel, VMSpec


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can be too long for the unix socket paths a VMSpec checks.
    with tempfile.TemporaryDirectory(prefix="ks-", dir="/tmp") as short:
        yield Path(short)


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Command lines the backend started; each one "succeeds" without running anything."""
    argvs: list[list[str]] = []

    def run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[bytes]:
        argvs.append(list(argv))
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr("kvmsandbox.hypervisor.qemu_backend.subprocess.run", run)
    return argvs


def fake_qemu(directory: Path) -> str:
    path = directory / "qemu-custom"
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return str(path)


def make_spec(run_dir: Path, **changes: Any) -> VMSpec:
    run_dir.mkdir(exist_ok=True)
    return VMSpec(
        name="pod-1",
        vcpus=1,
        memory_mib=128,
        accel="tcg",
        kernel=Path("/cache/vmlinuz"),
        initrd=Path("/cache/initrd.img"),
        cmdline="console=ttyS0",
        root_disk=Path("/cache/root.erofs"),
        shared_dir=None,
        agent=AgentChannel("virtio-serial", socket_path=run_dir / "agent.sock"),
        console_log=run_dir / "console.log",
        run_dir=run_dir,
        **changes,
    )


def test_boot_runs_the_configured_qemu_binary(short_dir: Path, started: list[list[str]]) -> None:
    binary = fake_qemu(short_dir)
    hv = QemuHypervisor(short_dir / "state", qemu_binary=binary)
    hv.boot(make_spec(short_dir / "run"))
    assert [argv[0] for argv in started] == [binary]


def test_boot_in_cgroups_execs_the_configured_qemu_binary(short_dir: Path, started: list[list[str]]) -> None:
    binary = fake_qemu(short_dir)
    hv = QemuHypervisor(short_dir / "state", qemu_binary=binary)
    hv.boot(make_spec(short_dir / "run", cgroup_procs=(Path("/sys/fs/cgroup/kvmsandbox/cgroup.procs"),)))
    (argv,) = started
    assert argv[0] == "/bin/sh"
    assert argv[argv.index("--") + 1] == binary


def test_open_hypervisor_gives_the_qemu_backend_its_binary(short_dir: Path, started: list[list[str]]) -> None:
    binary = fake_qemu(short_dir)
    hv = open_hypervisor("qemu", state_dir=short_dir / "state", qemu_binary=binary)
    hv.boot(make_spec(short_dir / "run"))
    assert [argv[0] for argv in started] == [binary]


@pytest.mark.parametrize("binary", ["/nonexistent/qemu-system-x86_64", "qemu-system-kvmsandbox-missing"])
def test_boot_with_a_missing_qemu_binary_names_it_and_starts_nothing(
    binary: str, short_dir: Path, started: list[list[str]]
) -> None:
    hv = QemuHypervisor(short_dir / "state", qemu_binary=binary)
    with pytest.raises(HypervisorError, match=rf"pod-1.*QEMU binary '{binary}' not found.*hypervisor\.qemu_binary"):
        hv.boot(make_spec(short_dir / "run"))
    assert started == []
    assert hv.list() == []


def test_boot_with_a_qemu_binary_that_is_not_executable_names_it(short_dir: Path, started: list[list[str]]) -> None:
    binary = short_dir / "qemu-not-executable"
    binary.write_text("")
    hv = QemuHypervisor(short_dir / "state", qemu_binary=str(binary))
    with pytest.raises(HypervisorError, match=str(binary)):
        hv.boot(make_spec(short_dir / "run"))
    assert started == []

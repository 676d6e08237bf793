"""The qemu backend runs the QEMU it is configured with, and says so when that QEMU is missing.
QEMU itself is replaced by a stand-in that records its command line: no VM boots here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor.factory import open_hypervisor
from kvmsandbox.hypervisor.process import STDERR_MAX_BYTES, launch_detached, wait_exited
from kvmsandbox.hypervisor.qemu_backend import QemuHypervisor
from kvmsandbox.hypervisor.spec import AgentChannel, VMSpec


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # pytest's tmp_path can be too long for the unix socket paths a VMSpec checks.
    with tempfile.TemporaryDirectory(prefix="ks-", dir="/tmp") as short:
        yield Path(short)


def fake_qemu(directory: Path) -> str:
    """A stand-in that records how it was started in ``started`` next to it and fails."""
    path = directory / "qemu-custom"
    path.write_text(
        f'#!/bin/sh\necho "$0" >> {directory}/started\necho "qemu-custom: failing on purpose" >&2\nexit 1\n'
    )
    path.chmod(0o755)
    return str(path)


def started(directory: Path) -> list[str]:
    log = directory / "started"
    return log.read_text().split() if log.exists() else []


def make_spec(run_dir: Path, **changes: Any) -> VMSpec:
    run_dir.mkdir(exist_ok=True)
    for name in ("vmlinuz", "initrd.img", "root.img"):
        (run_dir / name).touch()
    return VMSpec(
        name="pod-1",
        vcpus=1,
        memory_mib=128,
        accel="tcg",
        kernel=run_dir / "vmlinuz",
        initrd=run_dir / "initrd.img",
        cmdline="console=ttyS0",
        root_disk=run_dir / "root.img",
        shared_fs_socket=None,
        agent=AgentChannel("virtio-serial", socket_path=run_dir / "agent.sock"),
        console_log=run_dir / "console.log",
        run_dir=run_dir,
        **changes,
    )


def test_boot_runs_the_configured_qemu_binary_and_reports_its_stderr(short_dir: Path) -> None:
    binary = fake_qemu(short_dir)
    hv = QemuHypervisor(short_dir / "state", qemu_binary=binary)
    with pytest.raises(HypervisorError, match=r"pod-1.*exited while starting.*failing on purpose"):
        hv.boot(make_spec(short_dir / "run"))
    assert started(short_dir) == [binary]
    assert hv.list() == []


def test_boot_in_cgroups_execs_the_configured_qemu_binary(short_dir: Path) -> None:
    binary = fake_qemu(short_dir)
    procs = short_dir / "cgroup.procs"
    procs.write_text("")
    hv = QemuHypervisor(short_dir / "state", qemu_binary=binary)
    with pytest.raises(HypervisorError, match="failing on purpose"):
        hv.boot(make_spec(short_dir / "run", cgroup_procs=(procs,)))
    assert started(short_dir) == [binary]
    assert procs.read_text().strip().isdigit()


def test_open_hypervisor_gives_the_qemu_backend_its_binary(short_dir: Path) -> None:
    binary = fake_qemu(short_dir)
    hv = open_hypervisor("qemu", state_dir=short_dir / "state", qemu_binary=binary, vmm_uid_base=0)
    with pytest.raises(HypervisorError):
        hv.boot(make_spec(short_dir / "run"))
    assert started(short_dir) == [binary]


@pytest.mark.parametrize("binary", ["/nonexistent/qemu-system-x86_64", "qemu-system-kvmsandbox-missing"])
def test_boot_with_a_missing_qemu_binary_names_it_and_starts_nothing(binary: str, short_dir: Path) -> None:
    hv = QemuHypervisor(short_dir / "state", qemu_binary=binary)
    with pytest.raises(HypervisorError, match=rf"pod-1.*QEMU binary '{binary}' not found.*hypervisor\.qemu_binary"):
        hv.boot(make_spec(short_dir / "run"))
    assert hv.list() == []


def test_boot_with_a_qemu_binary_that_is_not_executable_names_it(short_dir: Path) -> None:
    binary = short_dir / "qemu-not-executable"
    binary.write_text("")
    hv = QemuHypervisor(short_dir / "state", qemu_binary=str(binary))
    with pytest.raises(HypervisorError, match=str(binary)):
        hv.boot(make_spec(short_dir / "run"))
    assert hv.list() == []


def test_a_jailed_qemu_runs_as_its_own_uid_without_capabilities_and_sees_only_its_jail(short_dir: Path) -> None:
    # The stand-in reports what it can see on stderr, which the boot error quotes.
    probe = short_dir / "qemu-probe"
    probe.write_text(
        "#!/bin/sh\n"
        'echo "ids $(id -u) $(id -g) groups $(id -G)" >&2\n'
        'echo "root $(ls / | tr "\\n" " ")" >&2\n'
        'echo "vm $(ls /vm | tr "\\n" " ")" >&2\n'
        'echo "dev $(ls /dev | tr "\\n" " ")" >&2\n'
        '[ -e /proc/self ] && echo "proc visible" >&2\n'
        'touch /vm/x 2>/dev/null && echo "vm writable" >&2\n'
        f'[ -e {short_dir} ] && echo "host dir visible" >&2\n'
        "exit 1\n"
    )
    probe.chmod(0o755)
    hv = QemuHypervisor(short_dir / "state", qemu_binary=str(probe), uid_base=3_000_000)
    with pytest.raises(HypervisorError) as failure:
        hv.boot(make_spec(short_dir / "run"))
    said = str(failure.value)
    (uid, gid) = [int(x) for x in said.split("ids ")[1].split()[:2]]
    assert 3_000_000 <= uid < 3_000_000 + (1 << 20) and gid == uid
    assert "groups " + str(gid) in said
    assert "root bin dev etc lib lib64 sbin usr vm " in said
    assert "vm initrd kernel qemu " in said
    assert "dev null random urandom zero" in said
    assert "proc visible" not in said and "vm writable" not in said and "host dir visible" not in said
    assert hv.list() == []
    assert sorted(p.name for p in (short_dir / "run").iterdir()) == ["console.log", "initrd.img", "root.img", "vmlinuz"]


def test_what_qemu_writes_to_stderr_is_capped_and_it_is_nobodys_child(short_dir: Path) -> None:
    log = short_dir / "stderr.log"
    chatty = ["/bin/sh", "-c", "yes 'virtio: bogus request from the guest' | head -c 4000000 >&2; echo done >&2"]
    pid, head = launch_detached(chatty, log)
    wait_exited(pid, 30)
    wait_exited(head, 5)
    assert log.stat().st_size == STDERR_MAX_BYTES
    assert log.read_text().startswith("virtio: bogus request")
    assert (
        not Path(f"/proc/{pid}/cmdline").exists()
        or int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != os.getpid()
    )


def test_adopt_moves_a_vms_record_and_run_dir_to_a_sandboxs_names(short_dir: Path) -> None:
    import json

    hv = QemuHypervisor(short_dir / "state")
    old_run, new_run = short_dir / "w-1", short_dir / "pod"
    old_run.mkdir()
    new_run.mkdir()  # made empty by the sandbox's boot, as prepare_host does
    (old_run / "agent.sock").write_text("")
    (old_run / "qmp.sock").write_text("")
    record = {
        "name": "kvsb-warm-1",
        "run_dir": str(old_run),
        "qmp_socket": str(old_run / "qmp.sock"),
        "agent_socket": str(old_run / "agent.sock"),
        "pid": 0,
        "start_time": 0,
        "uid": 0,
    }
    (short_dir / "state" / "kvsb-warm-1.json").write_text(json.dumps(record))
    hv.adopt("kvsb-warm-1", "kvmsandbox-pod", new_run)
    moved = json.loads((short_dir / "state" / "kvmsandbox-pod.json").read_text())
    assert moved["name"] == "kvmsandbox-pod" and moved["agent_socket"] == str(new_run / "agent.sock")
    assert moved["qmp_socket"] == str(new_run / "qmp.sock") and (new_run / "agent.sock").exists()
    assert not old_run.exists() and not (short_dir / "state" / "kvsb-warm-1.json").exists()
    with pytest.raises(HypervisorError, match="not known"):
        hv.adopt("kvsb-warm-1", "kvmsandbox-other", short_dir / "x")
    (short_dir / "state" / "kvsb-warm-2.json").write_text(json.dumps({**record, "name": "kvsb-warm-2"}))
    with pytest.raises(HypervisorError, match="exists already"):
        hv.adopt("kvsb-warm-2", "kvmsandbox-pod", short_dir / "y")

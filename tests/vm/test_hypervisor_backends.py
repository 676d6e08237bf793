"""Both hypervisor backends boot the same VMSpec into a real guest (TCG here) and clean up after it.

The guest is the guest image's kernel and initramfs with our own /init appended: it loads the
image's modules, mounts the shared dir over virtio-fs (the test starts virtiofsd), opens the agent's
virtio-serial port and answers one line per line, so these tests exercise the backends without the
agent.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmsandbox.errors import HypervisorError
from kvmsandbox.guest_image import GuestImage
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.hypervisor.factory import open_hypervisor
from kvmsandbox.hypervisor.libvirt_embed import (
    CAPABILITIES_DIR,
    embed_uri,
    prepare_embed_root,
    seed_capabilities,
)
from kvmsandbox.hypervisor.process import is_qemu_of
from kvmsandbox.hypervisor.qemu_backend import QemuHypervisor
from kvmsandbox.hypervisor.spec import (
    AGENT_PORT_NAME,
    SHARED_DIR_TAG,
    AgentChannel,
    Hypervisor,
    VMSpec,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("KVMSANDBOX_TEST_CACHE", "/var/cache/kvmsandbox"))
BACKENDS = ("libvirt", "qemu")
# Guest boot to the /init prompt takes ~5 s under TCG; leave room for a loaded CI machine.
GUEST_TIMEOUT = 90.0

ECHO_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read m; do insmod /lib/modules/$m.ko; done < /lib/modules/load-order
i=0; while [ ! -e /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
ro=$(cat /sys/block/vda/ro 2>/dev/null || echo missing)
share=none
if mount -t virtiofs {SHARED_DIR_TAG} /mnt; then
  echo from-guest > /mnt/guest-wrote && share=ok
fi
port=""
for n in /sys/class/virtio-ports/*/name; do
  [ "$(cat $n)" = {AGENT_PORT_NAME} ] && port=/dev/$(basename $(dirname $n))
done
echo "hvtest: ready ro=$ro share=$share port=$port"
[ -n "$port" ] || poweroff -f
exec 3<>$port
while true; do
  # With no host client connected the port reads EOF at once: back off instead of spinning.
  if ! read -r cmd arg <&3; then sleep 0.2; continue; fi
  case "$cmd" in
    poweroff) echo bye >&3; poweroff -f ;;
    cat) echo "file $(cat /mnt/$arg 2>/dev/null || echo missing)" >&3 ;;
    *) echo "echo $cmd ro=$ro share=$share" >&3 ;;
  esac
done
"""


@dataclasses.dataclass(frozen=True)
class EchoGuest:
    kernel: Path
    initrd: Path
    root_disk: Path


@pytest.fixture(scope="session")
def echo_guest(guest_image: GuestImage) -> Iterator[EchoGuest]:
    """The guest image's kernel and initramfs with our /init appended: the kernel unpacks
    concatenated cpio archives in order, so the later /init replaces the image's. World-readable,
    as the guest image is: QEMU runs as a uid of its own and opens them itself."""
    work = Path(tempfile.mkdtemp(prefix="ks-echo-", dir="/tmp"))
    work.chmod(0o755)
    try:
        yield _make_echo_guest(guest_image, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _make_echo_guest(guest_image: GuestImage, work: Path) -> EchoGuest:
    stage = work / "stage"
    for d in ("bin", "mnt"):
        (stage / d).mkdir(parents=True)
    (stage / "init").write_text(ECHO_INIT)
    (stage / "init").chmod(0o755)
    overlay = work / "overlay.cpio"
    files = subprocess.run(["find", "."], cwd=stage, check=True, capture_output=True).stdout
    with overlay.open("wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, input=files, stdout=out, check=True)
    initrd = work / "initrd.cpio"
    initrd.write_bytes(guest_image.initrd.read_bytes() + overlay.read_bytes())
    root_disk = work / "root.img"
    with root_disk.open("wb") as f:
        f.truncate(1 << 20)
    for path in (initrd, root_disk):
        path.chmod(0o644)
    return EchoGuest(kernel=guest_image.kernel, initrd=initrd, root_disk=root_disk)


@pytest.fixture(scope="module", params=BACKENDS)
def hypervisor(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hypervisor]:
    backend: str = request.param
    uri = None
    root: Path | None = None
    if backend == "libvirt":
        # One embed root per process and session (libvirt allows no second one): conftest's.
        root = request.getfixturevalue("libvirt_root")
        uri = embed_uri(root)
    hv = open_hypervisor(backend, state_dir=tmp_path_factory.mktemp(f"hv-{backend}"), libvirt_uri=uri)
    yield hv
    hv.close()


@pytest.fixture
def vm_dir() -> Iterator[Path]:
    # Short, for unix socket paths; pytest's tmp_path can be too long.
    path = Path(tempfile.mkdtemp(prefix="ks-hv-", dir="/tmp"))
    path.chmod(0o711)  # VMMs (uids of their own) reach their libvirt files and virtio-fs socket here
    yield path
    virtiofsd.stop(path / "shared", path / "fs")
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def boot(hypervisor: Hypervisor) -> Iterator[Callable[[VMSpec], None]]:
    """Boots VMs and destroys whatever a test left running, even when it failed."""
    names: list[str] = []

    def boot_(spec: VMSpec) -> None:
        names.append(spec.name)
        hypervisor.boot(spec)

    yield boot_
    for name in names:
        hypervisor.destroy(name)


def make_spec(guest: EchoGuest, vm_dir: Path, **changes: Any) -> VMSpec:
    """A spec for the echo guest, with a virtiofsd serving ``vm_dir/shared`` (the sandbox layer
    starts it in the runtime; the vm_dir fixture stops it)."""
    for d in ("shared", "run", "fs"):
        (vm_dir / d).mkdir(exist_ok=True)
    if not virtiofsd.running_for(vm_dir / "shared"):
        virtiofsd.start(vm_dir / "shared", vm_dir / "fs" / "fs.sock")
    spec = VMSpec(
        name=f"hvt-{uuid.uuid4().hex[:10]}",
        vcpus=1,
        memory_mib=256,
        accel="tcg",
        kernel=guest.kernel,
        initrd=guest.initrd,
        cmdline="console=ttyS0 panic=-1 reboot=t",
        root_disk=guest.root_disk,
        shared_fs_socket=vm_dir / "fs" / "fs.sock",
        agent=AgentChannel("virtio-serial", socket_path=vm_dir / "run" / "agent.sock"),
        console_log=vm_dir / "console.log",
        run_dir=vm_dir / "run",
        tb_cache_mib=32,
    )
    return dataclasses.replace(spec, **changes)


def agent_socket(spec: VMSpec) -> Path:
    assert spec.agent is not None and spec.agent.socket_path is not None
    return spec.agent.socket_path


def ask(spec: VMSpec, line: str) -> str:
    """Send one line to the guest over a fresh connection to the agent socket; return its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(GUEST_TIMEOUT)
        s.connect(str(agent_socket(spec)))
        s.sendall(line.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode().strip()


def qemu_pids(name: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and is_qemu_of(int(p.name), name)]


def test_guest_boots_answers_over_the_agent_socket_and_sees_the_shared_dir(
    hypervisor: Hypervisor, boot: Callable[[VMSpec], None], echo_guest: EchoGuest, vm_dir: Path
) -> None:
    # The runtime's shared dir is a shared mount, so virtiofsd (a slave copy in its own mount
    # namespace) sees what is mounted below it after it started.
    shared = vm_dir / "shared"
    shared.mkdir()
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    subprocess.run(["mount", "--make-shared", str(shared)], check=True)
    spec = make_spec(echo_guest, vm_dir)
    try:
        _check_guest_and_share(hypervisor, boot, spec, vm_dir)
    finally:
        subprocess.run(["umount", "-l", str(shared)], check=True)


def _check_guest_and_share(hypervisor: Hypervisor, boot: Callable[[VMSpec], None], spec: VMSpec, vm_dir: Path) -> None:
    boot(spec)
    info = hypervisor.info(spec.name)
    assert info is not None and info.running and info.pid is not None
    assert is_qemu_of(info.pid, spec.name)
    assert info in hypervisor.list()

    assert ask(spec, "ping") == "echo ping ro=1 share=ok"
    # Every host connection is a fresh byte stream to the same guest port.
    assert ask(spec, "again") == "echo again ro=1 share=ok"
    assert (vm_dir / "shared" / "guest-wrote").read_text() == "from-guest\n"
    assert "hvtest: ready ro=1 share=ok port=/dev/vport" in spec.console_log.read_text()

    # The runtime mounts host paths below the shared dir while the VM runs: the guest must see them.
    late = vm_dir / "shared" / "late"
    late.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "late", str(late)], check=True)
    try:
        (late / "hello").write_text("from-host")
        assert ask(spec, "cat late/hello") == "file from-host"
    finally:
        hypervisor.destroy(spec.name)
        subprocess.run(["umount", "-l", str(late)], check=True)


def test_destroy_leaves_no_qemu_process_socket_log_or_record_and_is_idempotent(
    hypervisor: Hypervisor,
    boot: Callable[[VMSpec], None],
    echo_guest: EchoGuest,
    vm_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    spec = make_spec(echo_guest, vm_dir)
    boot(spec)
    assert qemu_pids(spec.name)
    started = time.monotonic()
    hypervisor.destroy(spec.name)
    print(f"{hypervisor.name}: destroy took {time.monotonic() - started:.3f}s")
    assert qemu_pids(spec.name) == []
    assert not agent_socket(spec).exists()
    assert sorted(p.name for p in spec.run_dir.iterdir()) == []
    if hypervisor.name == "libvirt":
        assert not (request.getfixturevalue("libvirt_root") / "log" / "qemu" / f"{spec.name}.log").exists()
    assert hypervisor.info(spec.name) is None
    assert spec.name not in [i.name for i in hypervisor.list()]
    hypervisor.destroy(spec.name)


def test_a_guest_that_powers_off_is_no_longer_running_and_destroy_cleans_up(
    hypervisor: Hypervisor, boot: Callable[[VMSpec], None], echo_guest: EchoGuest, vm_dir: Path
) -> None:
    spec = make_spec(echo_guest, vm_dir)
    boot(spec)
    assert ask(spec, "poweroff") == "bye"

    def stopped() -> bool:
        info = hypervisor.info(spec.name)
        return info is None or not info.running

    wait_until(stopped, 30, f"{spec.name} to stop running after poweroff")
    info = hypervisor.info(spec.name)
    # libvirt forgets a transient domain that stopped; the qemu backend keeps its record until destroy.
    assert info is None or (not info.running and info.pid is None)
    assert qemu_pids(spec.name) == []
    hypervisor.destroy(spec.name)
    assert hypervisor.info(spec.name) is None


def test_a_second_vm_with_the_same_name_is_refused(
    hypervisor: Hypervisor, boot: Callable[[VMSpec], None], echo_guest: EchoGuest, vm_dir: Path
) -> None:
    spec = make_spec(echo_guest, vm_dir)
    boot(spec)
    with pytest.raises(HypervisorError, match=spec.name):
        hypervisor.boot(spec)
    info = hypervisor.info(spec.name)
    assert info is not None and info.running


def test_boot_failure_carries_the_vmm_message_and_leaves_nothing_behind(
    hypervisor: Hypervisor, boot: Callable[[VMSpec], None], echo_guest: EchoGuest, vm_dir: Path
) -> None:
    spec = make_spec(echo_guest, vm_dir, kernel=vm_dir / "no-such-vmlinuz")
    with pytest.raises(HypervisorError, match="no-such-vmlinuz") as failure:
        boot(spec)
    assert spec.name in str(failure.value)
    assert hypervisor.info(spec.name) is None
    assert qemu_pids(spec.name) == []
    assert not agent_socket(spec).exists()


# Runs in a child process: a VM must outlive the process that booted it, and a new process (a
# restarted runtime) must find it again. libvirt allows one embed root per process, hence children.
CHILD = """
import base64, json, pickle, sys
from pathlib import Path
from kvmsandbox.hypervisor.factory import open_hypervisor
backend, state_dir, uri, action, arg = sys.argv[1:]
hv = open_hypervisor(backend, state_dir=Path(state_dir), libvirt_uri=uri or None)
before = [vars(i) for i in hv.list()]
if action == "boot":
    hv.boot(pickle.loads(base64.b64decode(arg)))
elif action == "destroy":
    hv.destroy(arg)
print(json.dumps({"before": before, "after": [vars(i) for i in hv.list()]}))
hv.close()
"""


def run_child(backend: str, state_dir: Path, uri: str, action: str, arg: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, backend, str(state_dir), uri, action, arg],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vm_outlives_the_process_that_booted_it_and_a_new_process_finds_it(
    backend: str, request: pytest.FixtureRequest, echo_guest: EchoGuest, vm_dir: Path
) -> None:
    state_dir = vm_dir / "state"
    uri = ""
    if backend == "libvirt":
        root = vm_dir / "lv"
        prepare_embed_root(root)
        seed_capabilities(root, request.getfixturevalue("libvirt_root") / CAPABILITIES_DIR)
        uri = embed_uri(root)
    spec = make_spec(echo_guest, vm_dir)
    booted = run_child(backend, state_dir, uri, "boot", base64.b64encode(pickle.dumps(spec)).decode())
    try:
        assert [vm["name"] for vm in booted["after"]] == [spec.name]
        pid = booted["after"][0]["pid"]
        assert is_qemu_of(pid, spec.name), "QEMU died with the process that booted it"
    finally:
        destroyed = run_child(backend, state_dir, uri, "destroy", spec.name)
    assert destroyed["before"] == [{"name": spec.name, "pid": pid, "running": True}]
    assert destroyed["after"] == []
    assert qemu_pids(spec.name) == []


def test_qemu_destroy_kills_a_qemu_that_does_not_answer_qmp(
    echo_guest: EchoGuest, vm_dir: Path, tmp_path: Path
) -> None:
    hv = QemuHypervisor(tmp_path / "state", stop_grace=0.5)
    spec = make_spec(echo_guest, vm_dir)
    info = hv.boot(spec)
    assert info.pid is not None
    os.kill(info.pid, signal.SIGSTOP)  # neither QMP nor SIGTERM gets an answer now; SIGKILL does
    try:
        hv.destroy(spec.name)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
    assert qemu_pids(spec.name) == []
    assert hv.info(spec.name) is None
    assert sorted(p.name for p in spec.run_dir.iterdir()) == []

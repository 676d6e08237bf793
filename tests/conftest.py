"""Shared fixtures. VM tests boot real guests (TCG on machines without usable KVM); one sandbox
per hypervisor backend is booted once per session and shared by the tests that allow it."""

from __future__ import annotations

import contextlib
import os

# The CRI tests use gRPC in this process, which also embeds libvirt; libvirt forks QEMU from its
# own threads and gRPC's fork handlers crash those children. Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.config import AgentConfig, Config, HypervisorConfig
from kvmsandbox.errors import HypervisorError
from kvmsandbox.guest_image import GuestImage, build_guest_image
from kvmsandbox.host.cgroups import HostCgroup
from kvmsandbox.hypervisor.factory import open_hypervisor
from kvmsandbox.hypervisor.libvirt_embed import prepare_embed_root, save_capabilities, seed_capabilities
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs

# The guest image and libvirt's capability cache are expensive to make: keep them outside the
# repo, shared by every run on this machine.
CACHE_DIR = Path(os.environ.get("KVMSANDBOX_TEST_CACHE", "/var/cache/kvmsandbox"))
BACKENDS = ("libvirt", "qemu")


def host_leftovers() -> list[str]:
    """What sandboxes of any test could leave on the host: VMs, pod namespaces, taps, masquerade
    and port-mapping rules of the test networks, VMM cgroups, mounts in the tests' tmp dirs."""
    found = [f"netns {p.name}" for p in Path("/run/netns").glob("kvmsandbox-*")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if ": kvt" in line]
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, check=False).stdout
    found += [f"iptables {line}" for line in nat.splitlines() if "kvmsandbox-test" in line]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup/memory").glob("kvmsandbox*/kvmsandbox-*")]
    # Mounts a test (or code it ran on the host, as the agent's sandbox setup) left in its tmp dirs.
    mounted = Path("/proc/self/mountinfo").read_text().splitlines()
    found += [f"mount {line.split()[4]}" for line in mounted if "/pytest-of-" in line.split()[4]]
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_on_the_host() -> Iterator[None]:
    """Checked once every session fixture (servers, managers, shared sandboxes) has torn down."""
    before = set(host_leftovers())
    yield
    left = [x for x in host_leftovers() if x not in before]
    assert not left, f"the tests left these on the host: {left}"


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest_image(CACHE_DIR / "guest-image").image


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))
    # As /run and /var/lib are: VMMs (uids of their own) pass through to the libvirt root's files
    # for them and to the virtio-fs socket the runtime gives them.
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_rootfs(tmp_path_factory.mktemp("layers") / "busybox")


def make_config(state_dir: Path, run_dir: Path, backend: str, libvirt_root: Path) -> Config:
    return Config(
        state_dir=state_dir,
        run_dir=run_dir,
        cache_dir=CACHE_DIR,
        hypervisor=HypervisorConfig(backend=backend, libvirt_uri=f"qemu:///embed?root={libvirt_root}"),  # type: ignore[arg-type]
        agent=AgentConfig(ready_timeout_seconds=180),
    )


@pytest.fixture(scope="session")
def libvirt_root(short_tmp: Path) -> Iterator[Path]:
    """The one embedded-libvirt root of the session (libvirt allows one per process), seeded with
    the cached QEMU capabilities so the probe runs once per machine, not once per run."""
    root = short_tmp / "lv"
    prepare_embed_root(root)
    seed_capabilities(root, CACHE_DIR / "libvirt-caps")
    yield root
    with contextlib.suppress(HypervisorError):
        save_capabilities(root, CACHE_DIR / "libvirt-caps")


@pytest.fixture(scope="session", params=BACKENDS)
def manager(
    request: pytest.FixtureRequest,
    guest_image: GuestImage,
    short_tmp: Path,
    tmp_path_factory: pytest.TempPathFactory,
    libvirt_root: Path,
) -> Iterator[SandboxManager]:
    backend: str = request.param
    config = make_config(tmp_path_factory.mktemp(f"state-{backend}"), short_tmp / backend, backend, libvirt_root)
    hv = open_hypervisor(
        backend,
        state_dir=config.state_dir,
        libvirt_uri=config.libvirt_uri if backend == "libvirt" else None,
        qemu_binary=config.hypervisor.qemu_binary,
        vmm_uid_base=config.hypervisor.vmm_uid_base,
    )
    mgr = SandboxManager(config, hv, guest_image)
    yield mgr
    for record in mgr.list_sandboxes():
        mgr.destroy_sandbox(record.id)
    hv.close()


@pytest.fixture(scope="session")
def sandbox(manager: SandboxManager) -> Iterator[SandboxRecord]:
    """A booted sandbox shared by the tests of one backend."""
    record = manager.create_sandbox(hostname="shared-pod")
    yield record
    manager.destroy_sandbox(record.id)
    # Its host cgroup went with it (only the VMM was in it: no runtime thread stayed behind).
    assert record.cgroup and not HostCgroup(record.cgroup).exists()

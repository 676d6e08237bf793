"""A real ``kvmsandbox serve`` in a subprocess, driven over its unix socket with a CRI client
made from the generated stubs, as kubelet and crictl drive it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.runtime.v1 import api_pb2_grpc
from kvmsandbox.guest_image import GuestImage
from kvmsandbox.hypervisor.libvirt_embed import prepare_embed_root, seed_capabilities
from tests.conftest import CACHE_DIR
from tests.registry import Registry, image_config, make_layer, push_image, running_registry
from tests.waiting import WaitTimeout, wait_until

REPO = Path(__file__).resolve().parents[2]


@dataclass
class CriServer:
    """The server process and clients of both services."""

    config_path: Path
    socket: Path
    state_dir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        assert self.channel is not None
        return api_pb2_grpc.RuntimeServiceStub(self.channel)  # type: ignore[no-untyped-call]

    @property
    def images(self) -> api_pb2_grpc.ImageServiceStub:
        assert self.channel is not None
        return api_pb2_grpc.ImageServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def start(self, timeout: float = 120) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child holds it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvmsandbox.cli", "--config", str(self.config_path), "serve"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        process = self.process

        def listening() -> bool:
            if self.socket.exists():
                return True
            if process.poll() is not None:
                raise AssertionError(f"kvmsandbox serve exited: {self.log.read_text()[-3000:]}")
            return False

        try:
            wait_until(listening, timeout, f"kvmsandbox serve to listen on {self.socket}")
        except WaitTimeout as e:
            raise AssertionError(f"{e}: {self.log.read_text()[-3000:]}") from None
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.runtime.Version(cri.VersionRequest(), timeout=30)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer ends the runtime: no chance to clean up."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None:
            self.process.kill()
            self.process.wait(60)
            self.process = None
        self.socket.unlink(missing_ok=True)  # left by the dead server; the next one makes its own

    def stop(self) -> None:
        """SIGTERM, as an init system stops the runtime: pods must keep running."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(60) == 0, self.log.read_text()[-3000:]
            self.process = None


@pytest.fixture(scope="session")
def cri_server(
    guest_image: GuestImage, short_tmp: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CriServer]:
    """The server finds the guest image in the cache; the fixture makes sure it is current."""
    base = short_tmp / "cri"
    state_dir = base / "s"
    libvirt_root = state_dir / "libvirt"
    prepare_embed_root(libvirt_root)
    seed_capabilities(libvirt_root, CACHE_DIR / "libvirt-caps")
    work = tmp_path_factory.mktemp("cri")
    config = {
        "state_dir": str(state_dir),
        "run_dir": str(base / "r"),
        "cache_dir": str(CACHE_DIR),
        "socket": str(base / "cri.sock"),
        "runtime_handlers": ["kvmsandbox", "kvmsandbox-alt"],
        "agent": {"ready_timeout_seconds": 240},
        "network": {"cni_conf_dirs": [str(write_cni_config(work / "net.d", work / "ipam"))]},
        "console": {"authorized_keys": str(console_keys(work))},
    }
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    server = CriServer(config_path, Path(config["socket"]), state_dir, work / "serve.log")
    server.start()
    yield server
    # Leave nothing behind: every pod the tests left is removed through the API.
    if server.channel is not None:
        for pod in server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
            server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    server.stop()
    subprocess.run(["ip", "link", "del", "dev", TEST_BRIDGE], capture_output=True, check=False)


def console_keys(work: Path) -> Path:
    """An operator's key (``work/console_key``) and the authorized-keys file that lets it in."""
    import paramiko

    key = paramiko.ECDSAKey.generate()
    key.write_private_key_file(str(work / "console_key"))
    keys = work / "console_authorized_keys"
    keys.write_text(f"# operators\n{key.get_name()} {key.get_base64()} operator@test\n")
    return keys


@pytest.fixture(autouse=True)
def _pods_left_are_removed(request: pytest.FixtureRequest) -> Iterator[None]:
    """One failing test must not fail the next ones: whatever pod it left (and the image use and CNI
    state that go with it) is removed through the API, and a server it left stopped is started."""
    yield
    if "cri_server" not in request.fixturenames:
        return
    server: CriServer = request.getfixturevalue("cri_server")
    if server.process is None:
        server.start()
    for pod in server.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items:
        server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=300)


# The pods of the CRI tests get their own bridge and subnet (not the node's default network).
TEST_BRIDGE = "kvsbtest0"
TEST_SUBNET = "10.78.0.0/24"


def write_cni_config(conf_dir: Path, ipam_dir: Path, bridge: str = TEST_BRIDGE, subnet: str = TEST_SUBNET) -> Path:
    conf_dir.mkdir(parents=True, exist_ok=True)
    conflist = {
        "cniVersion": "1.0.0",
        "name": "kvmsandbox-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (conf_dir / "10-test.conflist").write_text(json.dumps(conflist, indent=1))
    return conf_dir


@pytest.fixture(scope="session")
def cri_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("cri-registry")) as r:
        yield r


@pytest.fixture(scope="session")
def registry_host(cri_registry: Registry) -> str:
    return cri_registry.host


@pytest.fixture(scope="session")
def busybox_image(cri_registry: Registry, busybox_layer: Path) -> str:
    """A busybox image in the local registry, its config saying what an image usually says."""
    layer = make_layer(busybox_layer)
    config = image_config([layer], Cmd=["sh"], Env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], WorkingDir="/")
    push_image(cri_registry, "test/busybox", "1.0", [layer], config=config)
    return f"{cri_registry.host}/test/busybox:1.0"

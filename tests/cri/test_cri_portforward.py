"""Port-forward through the streaming server against ``kvmsandbox serve`` and a real guest: crictl
(v1.36, SPDY/3.1 as kubelet) reaches a server bound to 127.0.0.1 in the pod (which a VM runtime
that connects from the host side cannot) and one on all addresses, with data both ways and two
connections at once; a port nobody listens on is an error the client sees; the connection ends
with the pod."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from tests.cri.conftest import CriServer
from tests.cri.test_cri_lifecycle import container_config, pod_config
from tests.cri.test_cri_streaming import crictl_command
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

# A 3 MB file served by httpd on loopback only, and an echo server (nc) on every address.
SERVERS = (
    "mkdir -p /www && head -c 3000000 /dev/urandom > /www/blob && md5sum /www/blob > /www/blob.md5"
    " && httpd -f -p 127.0.0.1:8080 -h /www & nc -ll -p 8081 -e cat & wait"
)


@dataclass
class Pod:
    id: str
    container_id: str


@pytest.fixture
def pod(cri_server: CriServer, busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    rt = cri_server.runtime
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    config = pod_config("forwarded", tmp_path_factory.mktemp("portforward-logs"))
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=300).pod_sandbox_id
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container_config("servers", busybox_image, SERVERS), sandbox_config=config
        ),
        timeout=120,
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)

    def listening() -> bool:
        def run(*cmd: str) -> cri.ExecSyncResponse:
            return rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=30))

        out = run("netstat", "-ltn").stdout
        return b"127.0.0.1:8080" in out and b":8081" in out and run("test", "-s", "/www/blob.md5").exit_code == 0

    wait_until(listening, 60, "the servers in the pod to listen")
    yield Pod(pod_id, cid)
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Forward:
    """``crictl port-forward`` running, with its local ports."""

    def __init__(self, command: list[str], locals_: list[int]) -> None:
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.locals = locals_
        self.output = b""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"crictl port-forward exited: {self.proc.stdout.read()!r}")  # type: ignore[union-attr]
            try:
                for port in locals_:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(ready, 60, "crictl port-forward to listen")

    def close(self) -> bytes:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return out


def http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    return body


def echo(port: int, payload: bytes) -> bytes:
    """Sends ``payload`` while reading the echo, then half-closes and reads the rest."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        got = bytearray()

        def read() -> None:
            while chunk := s.recv(1 << 16):
                got.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reader.join(120)
        return bytes(got)


def test_crictl_port_forward_reaches_loopback_and_all_address_servers_both_ways_at_once(
    cri_server: CriServer, pod: Pod
) -> None:
    local_http, local_echo = free_port(), free_port()
    fwd = Forward(
        crictl_command(cri_server, "port-forward", pod.id, f"{local_http}:8080", f"{local_echo}:8081"),
        [
            local_http,
            local_echo,
        ],
    )
    try:
        payload = bytes(range(256)) * 4096  # 1 MiB
        results: dict[str, bytes] = {}

        def fetch() -> None:
            results["blob"] = http_get(local_http, "/blob")

        def send() -> None:
            results["echo"] = echo(local_echo, payload)

        threads = [threading.Thread(target=fetch), threading.Thread(target=send)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        expected_md5 = http_get(local_http, "/blob.md5").split()[0].decode()
        assert hashlib.md5(results["blob"]).hexdigest() == expected_md5 and len(results["blob"]) == 3_000_000
        assert results["echo"] == payload
        # Connections one after another on the same forward, too.
        assert echo(local_echo, b"again\n") == b"again\n"
    finally:
        fwd.close()


def test_a_port_nobody_listens_on_is_an_error_the_client_sees(cri_server: CriServer, pod: Pod) -> None:
    local = free_port()
    fwd = Forward(crictl_command(cri_server, "port-forward", pod.id[:12], f"{local}:9999"), [local])
    with socket.create_connection(("127.0.0.1", local), timeout=60) as s:
        s.settimeout(60)
        assert s.recv(100) == b""  # crictl closes the local connection
    out = fwd.close()
    assert b"cannot connect to 127.0.0.1:9999 in the pod" in out, out


def test_removing_the_pod_ends_a_forwarded_connection(cri_server: CriServer, pod: Pod) -> None:
    local = free_port()
    fwd = Forward(crictl_command(cri_server, "port-forward", pod.id, f"{local}:8081"), [local])
    try:
        with socket.create_connection(("127.0.0.1", local), timeout=120) as s:
            s.sendall(b"ping\n")
            assert s.recv(100) == b"ping\n"
            cri_server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=300)
            s.settimeout(120)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
    finally:
        fwd.close()


def test_port_forward_requests_it_cannot_serve_get_a_clear_status(cri_server: CriServer, pod: Pod) -> None:
    rt = cri_server.runtime
    for request, code, words in (
        (cri.PortForwardRequest(pod_sandbox_id=pod.id, port=[0]), grpc.StatusCode.INVALID_ARGUMENT, "invalid port 0"),
        (cri.PortForwardRequest(pod_sandbox_id="nope", port=[80]), grpc.StatusCode.NOT_FOUND, "nope"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            rt.PortForward(request)
        assert e.value.code() == code and words in (e.value.details() or ""), request
    url = rt.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod.id, port=[8081])).url
    assert url.startswith("http://127.0.0.1:") and "/portforward/" in url
    # A port-forward token on the exec path is refused, and spent: the right path then refuses it too.
    assert upgrade_status(url.replace("/portforward/", "/exec/"), "v4.channel.k8s.io") == 404
    assert upgrade_status(url, "portforward.k8s.io") == 404
    fresh = rt.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod.id, port=[8081])).url
    assert upgrade_status(fresh, "no-such-protocol") == 403  # an unknown subprotocol: a clear 4xx


def upgrade_status(url: str, protocol: str) -> int:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(
            f"POST {parts.path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            f"X-Stream-Protocol-Version: {protocol}\r\n\r\n".encode()
        )
        return int(s.recv(4096).split()[1])


def test_crictl_port_forward_over_websocket_tunnels_spdy(cri_server: CriServer, pod: Pod) -> None:
    """crictl --transport websocket (client-go's WebSocket port-forward) speaks
    SPDY/3.1+portforward.k8s.io: SPDY in binary messages."""
    local = free_port()
    command = crictl_command(cri_server, "port-forward", "--transport", "websocket", pod.id, f"{local}:8081")
    fwd = Forward(command, [local])
    try:
        payload = os.urandom(500_000)
        assert echo(local, payload) == payload
        assert echo(local, b"and again\n") == b"and again\n"
    finally:
        fwd.close()

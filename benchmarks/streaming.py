"""Streaming benchmark: exec round trips and throughput through the runtime's streaming server
(SPDY/3.1, as kubelet and crictl speak it), beside ExecSync and a direct TCP connection to the
pod's IP, measured in the same run.

    .venv/bin/python benchmarks/streaming.py [--backend libvirt|qemu] [--mib N] [--runs N]

One VM pod on a CNI bridge made for the run runs busybox httpd serving an N MiB file from tmpfs.
Exec round trip: ``true`` through the streaming server (URL issued, connection upgraded, streams
opened, status read) against ExecSync of ``true``, p50 and p95. Throughput: ``cat`` of the file
through exec's stdout against ExecSync (which reads all of it, keeping 8 MiB); an HTTP download of
the file through port-forward against the same download from the pod's IP. The client is a small
SPDY client in this script, so the figures are the runtime's, not a Go client's. Run as root on a
host set up by `make setup`.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from common import bench_manager

from kvmsandbox.config import NetworkConfig, StreamingConfig
from kvmsandbox.cri.streaming import spdy
from kvmsandbox.cri.streaming.remotecommand import Channels
from kvmsandbox.cri.streaming.service import ExecRequest, PortForwardRequest, Streaming
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.types import NetworkRequest
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs

# A client connection as (send, receive all and count, close).
Connection = tuple[Callable[[bytes], None], Callable[[], int], Callable[[], None]]
BRIDGE = "kvsbbench1"
SUBNET = "10.80.0.0/24"


class SpdyClient:
    """Just enough of a SPDY/3.1 client: upgrade, open streams, read data until a stream's end."""

    def __init__(self, url: str, protocol: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=600)
        self.sock.sendall(
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            f"X-Stream-Protocol-Version: {protocol}\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head!r}")
        self.encoder, self.decoder = spdy.Encoder(), spdy.Decoder()
        self.pending = self.decoder.feed(rest)
        self.next_id = 1

    def open(self, **headers: str) -> int:
        stream_id, self.next_id = self.next_id, self.next_id + 2
        self.sock.sendall(self.encoder.encode(spdy.SynStream(stream_id, {k: [v] for k, v in headers.items()})))
        return stream_id

    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        self.sock.sendall(self.encoder.encode(spdy.DataFrame(stream_id, data, fin=fin)))

    def drain_until_fin(self, stream_id: int) -> int:
        """Bytes received on every stream until ``stream_id`` ends."""
        received = 0
        while True:
            for frame in self.pending:
                if isinstance(frame, spdy.DataFrame):
                    received += len(frame.data)
                    if frame.stream_id == stream_id and frame.fin:
                        self.pending = []
                        return received
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            self.pending = self.decoder.feed(chunk)

    def close(self) -> None:
        self.sock.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["libvirt", "qemu"], default="libvirt")
    parser.add_argument("--mib", type=int, default=64, help="size of the file streamed")
    parser.add_argument("--runs", type=int, default=20, help="exec round trips per path")
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/kvmsandbox"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kss-", dir="/tmp"))
    conf_dir = work / "net.d"
    conf_dir.mkdir()
    conflist = {
        "cniVersion": "1.0.0",
        "name": "kvmsandbox-bench-streaming",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]], "dataDir": str(work / "ipam")},
            }
        ],
    }
    (conf_dir / "10-bench.conflist").write_text(json.dumps(conflist))
    network = NetworkConfig(cni_conf_dirs=[conf_dir])
    results: dict[str, str] = {}
    with bench_manager(args.backend, args.cache_dir, work_dir=work, network=network) as (manager, _):
        streaming = Streaming(StreamingConfig(), manager)
        streaming.start()
        layer = make_busybox_rootfs(work / "busybox")
        record = manager.create_sandbox(hostname="bench-stream", network=NetworkRequest(port_mappings=[], args={}))
        try:
            assert record.network is not None
            ip = record.network.addresses[0].split("/")[0]
            serve = (
                f"mkdir -p /dev/shm/www && dd if=/dev/zero of=/dev/shm/www/big bs=1M count={args.mib} 2>/dev/null"
                " && exec httpd -f -p 8080 -h /dev/shm/www"
            )
            c = manager.create_container(record.id, lower_dirs=[layer], process=ProcessSpec(args=["sh", "-c", serve]))
            manager.start_container(record.id, c.id)
            time.sleep(3)

            def spdy_exec(cmd: list[str]) -> int:
                request = ExecRequest(record.id, c.id, tuple(cmd), Channels(stdout=True, stderr=True))
                client = SpdyClient(streaming.url(request), "v4.channel.k8s.io")
                try:
                    error = client.open(streamtype="error")
                    client.open(streamtype="stdout")
                    client.open(streamtype="stderr")
                    return client.drain_until_fin(error)
                finally:
                    client.close()

            def timed(f: Callable[[], object]) -> float:
                t0 = time.monotonic()
                f()
                return time.monotonic() - t0

            spdy_exec(["true"])  # warm up (TCG translates the guest's code on first use)
            manager.exec_sync(record.id, c.id, ["true"])
            rtt_spdy = [timed(lambda: spdy_exec(["true"])) for _ in range(args.runs)]
            rtt_sync = [timed(lambda: manager.exec_sync(record.id, c.id, ["true"])) for _ in range(args.runs)]
            for name, values in (("exec `true` through SPDY", rtt_spdy), ("ExecSync `true`", rtt_sync)):
                results[name] = (
                    f"p50 {statistics.median(values) * 1000:7.1f} ms  p95 {percentile(values, 0.95) * 1000:7.1f} ms"
                )

            size = args.mib << 20

            def rate(seconds: float) -> float:
                return args.mib / seconds

            cat = ["cat", "/dev/shm/www/big"]
            t_exec = statistics.median(timed(lambda: spdy_exec(cat)) for _ in range(3))
            t_sync = statistics.median(
                timed(lambda: manager.exec_sync(record.id, c.id, cat, timeout=600)) for _ in range(3)
            )

            def download(
                connect: Callable[[], tuple[Callable[[bytes], None], Callable[[], int], Callable[[], None]]],
            ) -> None:
                send, receive, close = connect()
                send(b"GET /big HTTP/1.0\r\nHost: pod\r\n\r\n")
                got = receive()
                close()
                if got < size:
                    raise RuntimeError(f"downloaded {got} bytes of {size}")

            def direct() -> Connection:
                sock = socket.create_connection((ip, 8080), timeout=600)

                def receive() -> int:
                    total = 0
                    while chunk := sock.recv(1 << 20):
                        total += len(chunk)
                    return total

                return sock.sendall, receive, sock.close

            def forwarded() -> Connection:
                client = SpdyClient(streaming.url(PortForwardRequest(record.id)), "portforward.k8s.io")
                client.open(streamtype="error", port="8080", requestid="0")
                data = client.open(streamtype="data", port="8080", requestid="0")
                return (lambda b: client.send(data, b)), (lambda: client.drain_until_fin(data)), client.close

            download(direct)
            download(forwarded)
            t_direct = statistics.median(timed(lambda: download(direct)) for _ in range(3))
            t_forward = statistics.median(timed(lambda: download(forwarded)) for _ in range(3))
            results[f"exec `cat` {args.mib} MiB through SPDY"] = f"{rate(t_exec):8.1f} MiB/s"
            results[f"ExecSync `cat` {args.mib} MiB"] = f"{rate(t_sync):8.1f} MiB/s"
            results[f"port-forward HTTP {args.mib} MiB"] = f"{rate(t_forward):8.1f} MiB/s"
            results[f"pod IP HTTP {args.mib} MiB"] = f"{rate(t_direct):8.1f} MiB/s"
            results["port-forward / pod IP"] = f"x{t_direct / t_forward:.2f}"
            results["exec SPDY / ExecSync (throughput)"] = f"x{t_sync / t_exec:.2f}"
        finally:
            manager.destroy_sandbox(record.id)
            streaming.stop()
            subprocess.run(["ip", "link", "del", "dev", BRIDGE], capture_output=True, check=False)

    print(f"backend {args.backend}, accel {manager.accel}, {args.runs} round trips, medians of 3 transfers")
    for name, figure in results.items():
        print(f"  {name:<40} {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

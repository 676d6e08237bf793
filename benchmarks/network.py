"""Network benchmark: round-trip time and throughput host<->pod and pod<->pod, beside the same
measured between two plain network namespaces on the same CNI bridge in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/network.py [--backend libvirt|qemu] [--mib N]

Two VM pods and two plain namespaces get their interfaces from the same CNI config (a bridge made
for the run, host-local IPAM). RTT is ping's average over 20 pings; throughput is an HTTP download
of an N MiB file from busybox httpd (served from tmpfs) with busybox wget. The ratio pod/plain is
the figure: it is what the VM (virtio-net, the tap, tc mirred, TCG here) costs. Run as root on a
host set up by `make setup`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from common import bench_manager

from kvmsandbox.config import NetworkConfig
from kvmsandbox.network import netns
from kvmsandbox.network.cni import CniRunner
from kvmsandbox.network.cni_config import load_network_config
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.types import NetworkRequest
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs

BRIDGE = "kvsbbench0"
SUBNET = "10.79.0.0/24"
PING_RTT = re.compile(r"min/avg/max(?:/mdev)? = [\d.]+/([\d.]+)/")


def conflist(ipam_dir: Path) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "kvmsandbox-bench",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


def rtt_ms(output: str) -> float:
    m = PING_RTT.search(output)
    if m is None:
        raise RuntimeError(f"no ping summary in: {output[-300:]}")
    return float(m.group(1))


def run(argv: list[str], timeout: float = 300) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["libvirt", "qemu"], default="libvirt")
    parser.add_argument("--mib", type=int, default=32, help="size of the downloaded file")
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/kvmsandbox"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ksn-", dir="/tmp"))
    conf_dir = work / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-bench.conflist").write_text(json.dumps(conflist(work / "ipam")))
    network = NetworkConfig(cni_conf_dirs=[conf_dir])
    with bench_manager(args.backend, args.cache_dir, work_dir=work, network=network) as (manager, _):
        layer = make_busybox_rootfs(work / "busybox")
        runner = CniRunner(
            load_network_config([conf_dir]), list(manager.config.network.cni_bin_dirs), work / "cni-cache"
        )
        serve = (
            f"mkdir -p /dev/shm/www && dd if=/dev/zero of=/dev/shm/www/big bs=1M count={args.mib} 2>/dev/null && "
            "exec httpd -f -p 80 -h /dev/shm/www"
        )
        pods: list[str] = []
        plain: list[str] = []
        servers: list[subprocess.Popen[bytes]] = []
        results: dict[str, tuple[float, float]] = {}
        try:
            # Two VM pods: a server in A, a client in B.
            ips: list[str] = []
            containers: list[str] = []
            for name in ("bench-a", "bench-b"):
                record = manager.create_sandbox(hostname=name, network=NetworkRequest(port_mappings=[], args={}))
                pods.append(record.id)
                assert record.network is not None
                ips.append(record.network.addresses[0].split("/")[0])
                script = serve if name == "bench-a" else "sleep 100000"
                c = manager.create_container(
                    record.id, lower_dirs=[layer], process=ProcessSpec(args=["sh", "-c", script])
                )
                manager.start_container(record.id, c.id)
                containers.append(c.id)
            # Two plain namespaces on the same bridge: the same server and client, without a VM.
            plain_ips: list[str] = []
            www = work / "www"
            www.mkdir()
            with open(www / "big", "wb") as f:
                f.truncate(args.mib << 20)
            for i in range(2):
                ns = f"kvsbench-{i}"
                netns.delete_netns(ns)
                path = netns.create_netns(ns)
                plain.append(ns)
                runner.run_loopback(path)
                result = runner.add(f"bench-plain-{i}", path, "eth0")
                plain_ips.append(result.pod_ips()[0].address.split("/")[0])
            servers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", plain[0], "busybox", "httpd", "-f", "-p", "80", "-h", str(www)]
                )
            )
            time.sleep(2)

            def pod_exec(cmd: str) -> str:
                r = manager.exec_sync(pods[1], containers[1], ["sh", "-c", cmd], timeout=600)
                if r.exit_code != 0:
                    raise RuntimeError(f"{cmd!r} failed: {r.stderr.decode()}")
                return r.stdout.decode()

            timed_wget = (
                "read s _ < /proc/uptime; wget -q -O /dev/null http://{ip}/big; read e _ < /proc/uptime; echo $s $e"
            )

            def host_download(ip: str) -> float:
                t0 = time.monotonic()
                with urllib.request.urlopen(f"http://{ip}/big", timeout=600) as r:
                    while r.read(1 << 20):
                        pass
                return time.monotonic() - t0

            mib_bits = args.mib * 8 * 1.048576  # Mbit
            # Warm up both servers (TCG translates httpd's code on first use).
            host_download(ips[0])
            host_download(plain_ips[0])

            def median_of(f: Callable[[], float], n: int = 3) -> float:
                return statistics.median(f() for _ in range(n))

            def pod_download() -> float:
                start, end = (float(v) for v in pod_exec(timed_wget.format(ip=ips[0])).split())
                return end - start

            def plain_download() -> float:
                t0 = time.monotonic()
                run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        plain[1],
                        "busybox",
                        "wget",
                        "-q",
                        "-O",
                        "/dev/null",
                        f"http://{plain_ips[0]}/big",
                    ]
                )
                return time.monotonic() - t0

            rtt = rtt_ms(run(["busybox", "ping", "-c", "20", "-i", "0.2", ips[0]]))
            results["host <- pod"] = (rtt, mib_bits / median_of(lambda: host_download(ips[0])))
            rtt = rtt_ms(run(["busybox", "ping", "-c", "20", "-i", "0.2", plain_ips[0]]))
            results["host <- plain netns"] = (rtt, mib_bits / median_of(lambda: host_download(plain_ips[0])))
            rtt = rtt_ms(pod_exec(f"ping -c 20 -i 0.2 {ips[0]}"))
            results["pod B <- pod A"] = (rtt, mib_bits / median_of(pod_download))
            rtt = rtt_ms(
                run(["ip", "netns", "exec", plain[1], "busybox", "ping", "-c", "20", "-i", "0.2", plain_ips[0]])
            )
            results["netns B <- netns A"] = (rtt, mib_bits / median_of(plain_download))
        finally:
            for p in servers:
                p.kill()
                p.wait()
            for i, ns in enumerate(plain):
                runner.delete(f"bench-plain-{i}", netns.netns_path(ns), "eth0")
                netns.delete_netns(ns)
            for pod_id in pods:
                manager.destroy_sandbox(pod_id)
            subprocess.run(["ip", "link", "del", "dev", BRIDGE], capture_output=True, check=False)

    print(
        f"backend {args.backend}, accel {manager.accel}, {args.mib} MiB HTTP download (median of 3), "
        "20 pings each (average)"
    )
    print(f"  {'path (data flows right to left)':<32} {'RTT ms':>8} {'Mbit/s':>9}")
    for name, (rtt, mbps) in results.items():
        print(f"  {name:<32} {rtt:>8.3f} {mbps:>9.1f}")
    for vm, base in (("host <- pod", "host <- plain netns"), ("pod B <- pod A", "netns B <- netns A")):
        (r1, t1), (r2, t2) = results[vm], results[base]
        print(f"  {vm} / {base}: RTT x{r1 / r2:.1f}, throughput x{t1 / t2:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

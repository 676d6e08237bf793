"""CRI lifecycle latencies, in the spirit of `critest -benchmark`: p50/p95 per operation over N
pods run one after another, then N pods in batches of 4 at once, against a real
`kvmsandbox serve` and a local registry (both started here, on loopback).

    PYTHONPATH=. .venv/bin/python benchmarks/cri_lifecycle.py [--pods N]   (it reuses tests/ helpers)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.hypervisor.libvirt_embed import prepare_embed_root, seed_capabilities
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs
from tests.cri.conftest import CriServer
from tests.registry import image_config, make_layer, push_image, running_registry

CACHE = Path("/var/cache/kvmsandbox")
OPS = [
    "PullImage",
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "ExecSync",
    "StopPodSandbox",
    "RemovePodSandbox",
]


def timed(results: dict[str, list[float]], op: str, call: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    out = call()
    results[op].append(time.monotonic() - t0)
    return out


def pod_lifecycle(server: CriServer, image: str, name: str, results: dict[str, list[float]], pull: bool) -> None:
    rt, img = server.runtime, server.images
    if pull:
        timed(results, "PullImage", lambda: img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image))))
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, uid=name, namespace="bench"))
    pod = timed(
        results, "RunPodSandbox", lambda: rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=600)
    ).pod_sandbox_id
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="c"), image=cri.ImageSpec(image=image), command=["sleep", "3600"]
    )
    cid = timed(
        results,
        "CreateContainer",
        lambda: rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config)
        ),
    ).container_id
    timed(results, "StartContainer", lambda: rt.StartContainer(cri.StartContainerRequest(container_id=cid)))
    timed(results, "ExecSync", lambda: rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=60)))
    timed(results, "StopPodSandbox", lambda: rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod)))
    timed(results, "RemovePodSandbox", lambda: rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod)))


def report(title: str, results: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"  {'operation':18} {'n':>3} {'p50 s':>8} {'p95 s':>8} {'max s':>8}")
    for op in OPS:
        values = sorted(results.get(op, []))
        if not values:
            continue
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        print(f"  {op:18} {len(values):3d} {statistics.median(values):8.3f} {p95:8.3f} {values[-1]:8.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kscb-", dir="/tmp"))
    work.chmod(0o711)  # VMMs run as uids of their own: they pass through to libvirt's files for them
    with running_registry(work / "registry") as registry:
        layer = make_layer(make_busybox_rootfs(work / "busybox"))
        push_image(registry, "bench/busybox", "1", [layer], config=image_config([layer], Cmd=["sh"]))
        image = f"{registry.host}/bench/busybox:1"
        state_dir = work / "s"
        prepare_embed_root(state_dir / "libvirt")
        seed_capabilities(state_dir / "libvirt", CACHE / "libvirt-caps")
        config_path = work / "config.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "state_dir": str(state_dir),
                    "run_dir": str(work / "r"),
                    "socket": str(work / "cri.sock"),
                    "cache_dir": str(CACHE),
                    "agent": {"ready_timeout_seconds": 600},
                }
            )
        )
        server = CriServer(config_path, work / "cri.sock", state_dir, work / "serve.log")
        server.start()
        try:
            serial: dict[str, list[float]] = defaultdict(list)
            for i in range(args.pods):
                # Pull afresh each time (the image is unused between pods) so PullImage is measured.
                server.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=image)))
                pod_lifecycle(server, image, f"serial-{i}", serial, pull=True)
            report(f"serial: {args.pods} pods, one after another", serial)
            parallel: dict[str, list[float]] = defaultdict(list)
            server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
            with ThreadPoolExecutor(4) as pool:
                list(
                    pool.map(lambda i: pod_lifecycle(server, image, f"par-{i}", parallel, pull=False), range(args.pods))
                )
            report(f"parallel: {args.pods} pods, 4 at a time (image already pulled)", parallel)
        finally:
            server.stop()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

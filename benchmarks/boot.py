"""Boot benchmark: request to agent-ready for N sandboxes, against the bare floor of the same
kernel and initramfs (an init that powers off at once), measured in the same run.

    .venv/bin/python benchmarks/boot.py [--boots N] [--backend libvirt|qemu] [--templates] [--network]

Prints min/median/max per phase, guest memory used and QEMU RSS once ready, and the ratio
sandbox-ready / bare-boot. With ``--templates`` (qemu backend) it also starts the same number of
clones of a VM template (built first, not timed) and as many pods that take a clone waiting in
the warm pool (refilled, untimed, before each), and prints request-to-ready p50/p95 of all three
and their ratios to the cold boot. Run as root on a host set up by `make setup`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import threading
import time
from pathlib import Path

from common import bench_manager

from kvmsandbox.config import TemplateConfig
from kvmsandbox.guest_image import GuestImage
from kvmsandbox.hypervisor.spec import Hypervisor, VMSpec
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.types import NetworkRequest
from kvmsandbox.sandbox.warm_pool import wait_filled

# With --network every pod gets one through the node's CNI config, as RunPodSandbox gives it.
NETWORK: list[NetworkRequest | None] = [None]
INIT_MARKER = re.compile(rb"kvmsandbox-init: reached init")
# How much of the console log the watcher reads: the head, where the marker is.
WATCH_BYTES = 1 << 20


def watch_console(
    path: Path, marker: re.Pattern[bytes], t0: float, out: dict[str, float], stop: threading.Event
) -> None:
    """Records the wall time (since t0) at which ``marker`` first shows in the console log."""
    while not stop.is_set():
        try:
            with open(path, "rb") as f:
                head = f.read(WATCH_BYTES)  # the marker comes early; a flooding guest is not read whole
            if marker.search(head):
                out["init"] = time.monotonic() - t0
                return
        except OSError:
            pass
        time.sleep(0.005)


def rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bare_boot(
    hv: Hypervisor, image: GuestImage, run_dir: Path, memory_mib: int, accel: str, i: int
) -> dict[str, float]:
    name = f"bench-bare-{i}"
    vm_dir = run_dir / name
    vm_dir.mkdir(parents=True, exist_ok=True)
    console = vm_dir / "console.log"
    spec = VMSpec(
        name=name,
        vcpus=1,
        memory_mib=memory_mib,
        accel=accel,
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=image.cmdline(bare=True),
        root_disk=image.rootfs,
        shared_fs_socket=None,
        agent=None,
        console_log=console,
        run_dir=vm_dir,
    )
    marks: dict[str, float] = {}
    stop = threading.Event()
    t0 = time.monotonic()
    watcher = threading.Thread(target=watch_console, args=(console, INIT_MARKER, t0, marks, stop))
    watcher.start()
    hv.boot(spec)
    marks["vmm"] = time.monotonic() - t0
    while True:
        info = hv.info(name)
        if info is None or not info.running:
            break
        time.sleep(0.005)
    marks["exit"] = time.monotonic() - t0
    stop.set()
    watcher.join()
    hv.destroy(name)
    return marks


def summary(values: list[float]) -> str:
    return f"min {min(values):6.2f}  median {statistics.median(values):6.2f}  max {max(values):6.2f}"


def boot_both(
    manager: SandboxManager, boots: int, memory_mib: int
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Boots the bare floor and a sandbox ``boots`` times each; their marks, floor first."""
    image, hv = manager.image, manager.hypervisor
    bare: list[dict[str, float]] = []
    ready: list[dict[str, float]] = []
    for i in range(boots):
        # Interleave floor and sandbox boots so machine noise hits both alike.
        bare.append(bare_boot(hv, image, manager.config.run_dir, memory_mib, manager.accel, i))
        marks: dict[str, float] = {}
        stop = threading.Event()
        sandbox_id = f"bench-{i}"
        console = manager.console_log(sandbox_id)
        t0 = time.monotonic()
        watcher = threading.Thread(target=watch_console, args=(console, INIT_MARKER, t0, marks, stop))
        watcher.start()
        record = manager.create_sandbox(sandbox_id, memory_mib=memory_mib, network=NETWORK[0])
        stop.set()
        watcher.join()
        timings = manager.boot_timings[record.id]
        details = manager.client(record.id).guest_details()
        info = hv.info(record.vm_name)
        marks.update(
            host=timings.host_prepared,
            cgroup=timings.vmm_placed,
            vmm=timings.vmm_started,
            agent=timings.agent_ready,
            ready=timings.sandbox_ready,
            guest_used_mib=(details.mem_total_bytes - details.mem_available_bytes) / 2**20,
            agent_rss_mib=details.agent_rss_bytes / 2**20,
            qemu_rss_mib=rss_mib(info.pid if info else None),
        )
        ready.append(marks)
        manager.destroy_sandbox(record.id)
        print(f"  boot {i + 1}: bare {bare[-1]['exit']:.2f}s, sandbox ready {marks['ready']:.2f}s", flush=True)
    return bare, ready


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def clone_boots(manager: SandboxManager, boots: int, memory_mib: int) -> list[float]:
    """Request-to-ready seconds of ``boots`` clones of the template of that size (built first)."""
    size = manager.templates.memory_class(memory_mib) or memory_mib
    started = time.monotonic()
    info = manager.templates.build(1, size)
    print(f"  template {info.key} built in {time.monotonic() - started:.2f}s "
          f"({info.data_bytes / 2**20:.1f} MiB of guest memory)", flush=True)  # fmt: skip
    seconds = []
    for i in range(boots):
        t0 = time.monotonic()
        record = manager.create_sandbox(
            f"bench-clone-{i}", memory_mib=memory_mib, from_template=True, network=NETWORK[0]
        )
        seconds.append(time.monotonic() - t0)
        assert record.template == info.key, "the clone booted cold"
        manager.destroy_sandbox(record.id)
        print(f"  clone {i + 1}: ready {seconds[-1]:.2f}s", flush=True)
    return seconds


def warm_boots(manager: SandboxManager, boots: int, memory_mib: int) -> list[float]:
    """Request-to-ready seconds of ``boots`` pods that each take a clone waiting in the warm pool
    (the pool is refilled, untimed, before each)."""
    pool = manager.warm_pool
    assert pool is not None, "no warm pool configured"
    manager.start_warm_pool()
    seconds = []
    for i in range(boots):
        if not wait_filled(pool, 300):
            raise SystemExit(f"the warm pool did not fill: {pool.status()['problem']}")
        t0 = time.monotonic()
        record = manager.create_sandbox(
            f"bench-warm-{i}", memory_mib=memory_mib, from_template=True, network=NETWORK[0]
        )
        seconds.append(time.monotonic() - t0)
        assert record.warm, "the pod took no waiting clone"
        manager.destroy_sandbox(record.id)
        print(f"  warm {i + 1}: ready {seconds[-1]:.2f}s", flush=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--backend", choices=["libvirt", "qemu"], default="qemu")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/cache/kvmsandbox"))
    parser.add_argument("--templates", action="store_true", help="also boot clones of a VM template (qemu)")
    parser.add_argument("--network", action="store_true", help="give every pod a network (the node's CNI config)")
    args = parser.parse_args()
    if args.network:
        NETWORK[0] = NetworkRequest()
    clones: list[float] = []
    warm: list[float] = []
    overrides = {"templates": TemplateConfig(handlers=["kvmsandbox"], warm_pool=1)} if args.templates else {}

    with bench_manager(args.backend, args.cache_dir, **overrides) as (manager, _):
        print(
            f"backend {args.backend}, accel {manager.accel} ({manager.accel_reason}), "
            f"transport {manager.transport}, {args.memory_mib} MiB, 1 vCPU, kernel {manager.image.kernel_version}"
        )
        bare, ready = boot_both(manager, args.boots, args.memory_mib)
        if args.templates:
            clones = clone_boots(manager, args.boots, args.memory_mib)
            warm = warm_boots(manager, args.boots, args.memory_mib)

    print("\nsandbox boot, seconds since the request (phases: host, cgroup, VM, agent, guest):")
    print(f"  host prepared      {summary([m['host'] for m in ready])}")
    print(f"  VMM cgroup placed  {summary([m['cgroup'] for m in ready])}")
    print(f"  VMM started        {summary([m['vmm'] for m in ready])}")
    print(f"  kernel reached init {summary([m.get('init', float('nan')) for m in ready])}")
    print(f"  agent answered     {summary([m['agent'] for m in ready])}")
    print(f"  sandbox ready      {summary([m['ready'] for m in ready])}  (guest configured)")
    print("bare boot (same kernel + initramfs, init powers off at once):")
    print(f"  VMM started        {summary([m['vmm'] for m in bare])}")
    print(f"  kernel reached init {summary([m.get('init', float('nan')) for m in bare])}")
    print(f"  VM exited          {summary([m['exit'] for m in bare])}")
    print("memory once ready, MiB:")
    print(f"  guest used (MemTotal-MemAvailable) {summary([m['guest_used_mib'] for m in ready])}")
    print(f"  agent RSS                          {summary([m['agent_rss_mib'] for m in ready])}")
    print(f"  QEMU RSS                           {summary([m['qemu_rss_mib'] for m in ready])}")
    ratio = statistics.median(m["ready"] for m in ready) / statistics.median(m["exit"] for m in bare)
    print(f"\nsandbox-ready / bare-boot (medians): {ratio:.2f}  (target <= 1.2)")
    if clones:
        cold = [m["ready"] for m in ready]
        print("\nrequest to ready, seconds   p50     p95")
        print(f"  cold boot            {percentile(cold, 0.5):7.2f} {percentile(cold, 0.95):7.2f}")
        print(f"  template clone       {percentile(clones, 0.5):7.2f} {percentile(clones, 0.95):7.2f}")
        print(f"  warm pool clone      {percentile(warm, 0.5):7.2f} {percentile(warm, 0.95):7.2f}")
        print(f"  clone / cold (p50)   {percentile(clones, 0.5) / percentile(cold, 0.5):7.2f}  (goal <= 0.30)")
        print(f"  warm / cold (p50)    {percentile(warm, 0.5) / percentile(cold, 0.5):7.2f}  (goal <= 0.10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

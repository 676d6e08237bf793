"""Storage benchmark: container rootfs as disks ("block") against host overlays over virtio-fs
("share"), both measured in the same run on the same machine.

    .venv/bin/python benchmarks/storage.py [--backend qemu|libvirt] [--creates N]

Per path: CreateContainer (+ its removal) p50 over N containers; then, in one fresh container,
reading a 64 MiB file of the image (the first read: cold in the guest), writing 128 MiB into the
writable layer (fsync'd) and ``find /`` over the busybox rootfs, each timed inside the guest
(/proc/uptime, 10 ms resolution). Prints each figure and the share/block ratio. Run as root on a
host set up by `make setup`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import bench_manager

from kvmsandbox.config import SandboxDefaults
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs

BIG_MIB = 64
WRITE_MIB = 128

# Prints the guest's uptime before and after the command: the command's own time, in the guest.
TIMED = 'read a _ </proc/uptime; {cmd} >/dev/null 2>&1; s=$?; read b _ </proc/uptime; echo "$a $b $s"'
TASKS = {
    f"read {BIG_MIB} MiB": "dd if=/data/big of=/dev/null bs=1M",
    f"write {WRITE_MIB} MiB": f"dd if=/dev/zero of=/written bs=1M count={WRITE_MIB} conv=fsync",
    "find /": "find / -xdev",
}


def make_layers(work: Path) -> list[Path]:
    """A busybox layer and, above it, a layer holding /data/big (random: nothing to compress)."""
    base = make_busybox_rootfs(work / "busybox")
    top = work / "data"
    (top / "data").mkdir(parents=True)
    with open(top / "data" / "big", "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))
    return [top, base]


def run_path(backend: str, mode: str, layers: list[Path], creates: int) -> dict[str, float]:
    out: dict[str, float] = {}
    sandbox_defaults = SandboxDefaults(container_rootfs=mode)  # type: ignore[arg-type]
    with bench_manager(backend, Path("/var/cache/kvmsandbox"), sandbox=sandbox_defaults) as (m, _):  # type: ignore[arg-type]
        record = m.create_sandbox(hostname=f"bench-{mode}")
        try:
            out["CreateContainer p50"] = create_p50(m, record.id, layers, creates)
            c = m.create_container(record.id, lower_dirs=layers, process=ProcessSpec(args=["sleep", "600"]))
            m.start_container(record.id, c.id)
            for name, cmd in TASKS.items():
                result = m.exec_sync(record.id, c.id, ["sh", "-c", TIMED.format(cmd=cmd)], timeout=600)
                before, after, status = result.stdout.decode().split()
                if status != "0":
                    raise SystemExit(f"{mode}: {cmd!r} failed with status {status}")
                out[name] = float(after) - float(before)
            m.stop_container(record.id, c.id, grace=0)
            m.remove_container(record.id, c.id)
        finally:
            m.destroy_sandbox(record.id)
    return out


def create_p50(m: SandboxManager, sandbox_id: str, layers: list[Path], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        c = m.create_container(sandbox_id, lower_dirs=layers, process=ProcessSpec(args=["true"]))
        times.append(time.monotonic() - t0)
        m.remove_container(sandbox_id, c.id)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["qemu", "libvirt"], default="qemu")
    parser.add_argument("--creates", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ksb-storage-") as work:
        layers = make_layers(Path(work))
        results = {mode: run_path(args.backend, mode, layers, args.creates) for mode in ("share", "block")}
    print(f"storage benchmark, backend={args.backend}, seconds (in-guest figures at 10 ms resolution)")
    print(f"{'':24} {'share (vfs)':>12} {'block':>12} {'share/block':>12}")
    for name in results["block"]:
        share, block = results["share"][name], results["block"][name]
        ratio = f"{share / block:.2f}x" if block > 0 else "n/a"
        print(f"{name:24} {share:12.3f} {block:12.3f} {ratio:>12}")


if __name__ == "__main__":
    main()

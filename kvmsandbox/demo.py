"""A visible demonstration: one sandbox VM, one container in it, its output, an exec, teardown."""

from __future__ import annotations

import time

from kvmsandbox.config import Config
from kvmsandbox.runtime import open_manager
from kvmsandbox.sandbox.logs import parse_cri_log
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs

DEMO_SCRIPT = (
    'echo "hello from container $(hostname) in a kvmsandbox VM"; '
    'echo "guest kernel: $(uname -r)"; '
    'echo "container memory: $(head -n1 /proc/meminfo)"; '
    "echo 'this line goes to stderr' >&2; "
    "trap 'echo got SIGTERM, exiting cleanly; exit 0' TERM; while true; do sleep 1; done"
)


def run_demo(config: Config, *, backend: str | None = None, keep: bool = False) -> int:
    manager = open_manager(config, backend)
    print(
        f"hypervisor: {manager.hypervisor.name}, accel: {manager.accel} ({manager.accel_reason}), "
        f"agent transport: {manager.transport}",
        flush=True,
    )
    layer = make_busybox_rootfs(config.cache_dir / "demo-busybox-rootfs")
    t0 = time.monotonic()
    sandbox = manager.create_sandbox(hostname="demo-pod")
    print(
        f"sandbox {sandbox.id[:12]} ready in {time.monotonic() - t0:.2f}s (vm {sandbox.vm_name}, "
        f"console log {manager.console_log(sandbox.id)})",
        flush=True,
    )
    try:
        details = manager.client(sandbox.id).guest_details()
        print(
            f"guest: kernel {details.kernel_release}, {details.mem_total_bytes >> 20} MiB total, "
            f"{details.mem_available_bytes >> 20} MiB available, agent RSS {details.agent_rss_bytes >> 20} MiB"
        )
        container = manager.create_container(
            sandbox.id, lower_dirs=[layer], process=ProcessSpec(args=["sh", "-c", DEMO_SCRIPT]), name="demo"
        )
        manager.start_container(sandbox.id, container.id)
        result = manager.exec_sync(sandbox.id, container.id, ["sh", "-c", "echo exec says: $(ps | wc -l) processes"])
        print(f"exec exit code {result.exit_code}: {result.stdout.decode().strip()}")
        status = manager.stop_container(sandbox.id, container.id, grace=5)
        manager.wait_output(sandbox.id, container.id, 10)
        print(f"container {container.id[:12]} exited with code {status.exit_code}; its log ({container.log_path}):")
        with open(container.log_path) as f:
            for stream, _, line in parse_cri_log(f.read()):
                print(f"  [{stream}] {line}")
        if not keep:
            manager.remove_container(sandbox.id, container.id)
    finally:
        if not keep:
            manager.destroy_sandbox(sandbox.id)
            print(f"sandbox {sandbox.id[:12]} destroyed: VM, rootfs and state removed")
    return 0

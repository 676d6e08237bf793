"""A visible demonstration: one sandbox VM, one container in it, its output, an exec, teardown."""

from __future__ import annotations

import shutil
import threading
import time
from typing import TYPE_CHECKING

from kvmsandbox.config import Config
from kvmsandbox.host.beneath import private_dir
from kvmsandbox.runtime import open_manager
from kvmsandbox.sandbox.logs import parse_cri_log
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.tools.busybox_rootfs import make_busybox_rootfs
from kvmsandbox.tools.local_registry import LocalRegistry

if TYPE_CHECKING:
    from kvmsandbox.cri.runtime.v1.api_pb2_grpc import ImageServiceStub, RuntimeServiceStub

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


DEMO_LABEL = {"app": "kvmsandbox-demo"}
DEMO_POD_SCRIPT = (
    'echo "hello from a kvmsandbox pod on kernel $(uname -r)"; '
    'mkdir -p /tmp/www && echo "hello from pod $(hostname)" > /tmp/www/index.html && httpd -p 8080 -h /tmp/www; '
    "while true; do date; sleep 5; done"
)


def _fetch(url: str, timeout: float = 30.0) -> str:
    """The body at ``url`` (the pod's web server may take a moment to listen)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode().strip())
        except OSError as e:
            if time.monotonic() > deadline:
                return f"nothing ({e})"
            time.sleep(0.5)


def run_cri_demo(config: Config, ready: threading.Event) -> None:
    """Once the server is up: pushes a busybox image to a registry on loopback, then pulls it and
    runs a pod through the server's own CRI socket, as kubelet would; the pod keeps running."""
    ready.wait()
    try:
        _cri_demo(config)
    except Exception as e:
        print(f"demo pod failed: {e}", flush=True)


def _cri_demo(config: Config) -> None:
    import grpc

    from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
    from kvmsandbox.cri.runtime.v1 import api_pb2_grpc

    channel = grpc.insecure_channel(f"unix://{config.socket}")
    rt = api_pb2_grpc.RuntimeServiceStub(channel)
    img = api_pb2_grpc.ImageServiceStub(channel)
    _remove_previous_demo(rt, img)
    ref = _push_and_pull_demo_image(config, img)
    log_dir = config.state_dir / "demo-logs"
    shutil.rmtree(log_dir, ignore_errors=True)  # the previous demo pod's, removed above
    private_dir(log_dir)
    pod_config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="demo", uid="kvmsandbox-demo", namespace="default"),
        hostname="demo",
        log_directory=str(log_dir),
        labels=DEMO_LABEL,
    )
    t0 = time.monotonic()
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config), timeout=600).pod_sandbox_id
    ip = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod)).status.network.ip
    print(f"demo: pod {pod[:12]} ready in {time.monotonic() - t0:.2f}s, pod IP {ip}", flush=True)
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="hello"),
        image=cri.ImageSpec(image=ref),
        command=["sh", "-c", DEMO_POD_SCRIPT],
        log_path="hello.log",
    )
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=pod_config)
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    result = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["uname", "-a"], timeout=60))
    print(f"demo: exec in container {cid[:12]}: {result.stdout.decode().strip()}", flush=True)
    print(f"demo: from the host, {_fetch(f'http://{ip}:8080/')!r} came back from the pod's web server", flush=True)
    time.sleep(1)
    print(f"demo: its log {log_dir / 'hello.log'} so far:", flush=True)
    for stream, _, line in parse_cri_log((log_dir / "hello.log").read_text()):
        print(f"  [{stream}] {line}", flush=True)
    print(
        f"demo: the pod keeps running; inspect it with crictl (runtime-endpoint unix://{config.socket}):\n"
        f"  crictl pods; crictl ps; crictl logs {cid[:12]}; crictl exec {cid[:12]} ps; crictl exec -s {cid[:12]} ps\n"
        "Ctrl-C stops the server (pods keep running; the next server recovers them).",
        flush=True,
    )


def _remove_previous_demo(rt: RuntimeServiceStub, img: ImageServiceStub) -> None:
    """Removes the pods and images an earlier demo left (its pod keeps running after the server stops)."""
    from kvmsandbox.cri.runtime.v1 import api_pb2 as cri

    for old in rt.ListPodSandbox(
        cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(label_selector=DEMO_LABEL))
    ).items:
        rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=old.id))
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=old.id))
    for old_image in img.ListImages(cri.ListImagesRequest()).images:
        if any("/kvmsandbox-demo/busybox:" in tag for tag in old_image.repo_tags):
            img.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=old_image.id)))


def _push_and_pull_demo_image(config: Config, img: ImageServiceStub) -> str:
    """Pushes a busybox image to a registry on loopback and pulls it through the CRI; returns its reference."""
    from kvmsandbox.cri.runtime.v1 import api_pb2 as cri

    registry = LocalRegistry()
    try:
        layer = make_busybox_rootfs(config.cache_dir / "demo-busybox-rootfs")
        ref = registry.push_tree("kvmsandbox-demo/busybox", "latest", layer, {"Cmd": ["sh"], "Env": ["PATH=/bin"]})
        t0 = time.monotonic()
        image_id = img.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref))).image_ref
        print(f"demo: pulled {ref} ({image_id[:19]}) in {time.monotonic() - t0:.2f}s", flush=True)
    finally:
        registry.stop()
    return ref

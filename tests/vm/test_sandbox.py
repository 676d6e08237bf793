"""A sandbox VM and containers inside it, on both hypervisor backends (real guests)."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import AgentError, DeadlineExceeded, InvalidArgument, KvmSandboxError, Unavailable
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.sandbox.logs import parse_cri_log
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.states import ContainerState, SandboxState
from kvmsandbox.sandbox.types import HostMount
from tests.vm.leaks import mount_options, mounts_below, mounts_inside, processes_mentioning
from tests.waiting import wait_until

pytestmark = pytest.mark.vm


def sh(script: str) -> ProcessSpec:
    return ProcessSpec(args=["sh", "-c", script])


def log_lines(path: str) -> list[tuple[str, str]]:
    with open(path) as f:
        return [(stream, content) for stream, _, content in parse_cri_log(f.read())]


def test_agent_is_ready_and_reports_the_guest(manager: SandboxManager, sandbox: SandboxRecord) -> None:
    details = manager.client(sandbox.id).guest_details()
    assert details.transport == manager.transport
    assert details.kernel_release == manager.image.kernel_version
    assert 0 < details.mem_total_bytes <= sandbox.memory_mib << 20
    assert 0 < details.agent_rss_bytes < 200 << 20
    assert details.oci_runtime.endswith("crun")


def test_container_output_reaches_the_host_log_and_exit_code_propagates(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    c = manager.create_container(
        sandbox.id, lower_dirs=[busybox_layer], process=sh("echo hello out; echo hello err >&2; exit 3")
    )
    manager.start_container(sandbox.id, c.id)
    status = manager.wait_container(sandbox.id, c.id, 60)
    assert status is not None and status.exit_code == 3
    assert manager.wait_output(sandbox.id, c.id, 30)
    lines = log_lines(c.log_path)
    assert ("stdout", "hello out") in lines
    assert ("stderr", "hello err") in lines
    record = manager.get_sandbox(sandbox.id).containers[c.id]
    assert record.state is ContainerState.EXITED and record.exit_code == 3
    manager.remove_container(sandbox.id, c.id)
    assert not mounts_inside(manager.sandbox_dir(sandbox.id) / "shared" / "containers")


def test_two_containers_in_one_sandbox_have_separate_writable_roots(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    a = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("echo a > /mine; sleep 600"))
    b = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("echo b > /mine; sleep 600"))
    try:
        manager.start_container(sandbox.id, a.id)
        manager.start_container(sandbox.id, b.id)
        states = {c.id: c.state for c in manager.client(sandbox.id).list_containers()}
        assert states[a.id] == pb.RUNNING and states[b.id] == pb.RUNNING

        def both_read_back() -> tuple[bytes, bytes] | None:
            seen = (
                manager.exec_sync(sandbox.id, a.id, ["cat", "/mine"]).stdout,
                manager.exec_sync(sandbox.id, b.id, ["cat", "/mine"]).stdout,
            )
            return seen if all(seen) else None

        seen = wait_until(both_read_back, 30, "both containers to have written /mine", interval=0.5)
        assert seen == (b"a\n", b"b\n")
        # The writable layer is on the host, below the sandbox dir, and the image layer is untouched.
        assert not (busybox_layer / "mine").exists()
        stats = manager.container_stats(sandbox.id, a.id)
        assert stats.memory_usage_bytes > 0 and stats.pids >= 1 and stats.cpu_usage_ns > 0
    finally:
        for c in (a, b):
            manager.stop_container(sandbox.id, c.id, grace=0)
            manager.remove_container(sandbox.id, c.id)


def test_exec_runs_in_the_container_and_returns_output_and_exit_code(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    c = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("sleep 600"))
    try:
        manager.start_container(sandbox.id, c.id)
        result = manager.exec_sync(sandbox.id, c.id, ["sh", "-c", "echo $((6 * 7)); hostname; echo to-err >&2; exit 5"])
        assert result.exit_code == 5
        assert result.stdout.decode().split() == ["42", sandbox.hostname]
        assert result.stderr == b"to-err\n"
        with pytest.raises(DeadlineExceeded):
            manager.exec_sync(sandbox.id, c.id, ["sleep", "30"], timeout=1)
    finally:
        manager.stop_container(sandbox.id, c.id, grace=0)
        manager.remove_container(sandbox.id, c.id)


def test_stop_sends_sigterm_first(manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path) -> None:
    c = manager.create_container(
        sandbox.id,
        lower_dirs=[busybox_layer],
        process=sh("trap 'echo got TERM; exit 7' TERM; echo armed; while true; do sleep 0.2; done"),
    )
    manager.start_container(sandbox.id, c.id)
    wait_until(lambda: ("stdout", "armed") in log_lines(c.log_path), 30, "the container to arm its trap", interval=0.2)
    status = manager.stop_container(sandbox.id, c.id, grace=20)
    assert status.exit_code == 7
    manager.wait_output(sandbox.id, c.id, 10)
    assert ("stdout", "got TERM") in log_lines(c.log_path)
    manager.remove_container(sandbox.id, c.id)


def test_stop_kills_after_the_grace_period(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    # PID 1 of a pid namespace ignores SIGTERM without a handler: only SIGKILL ends it.
    c = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=ProcessSpec(args=["sleep", "600"]))
    manager.start_container(sandbox.id, c.id)
    t0 = time.monotonic()
    status = manager.stop_container(sandbox.id, c.id, grace=2)
    assert time.monotonic() - t0 >= 2
    assert status.exit_code == 137 and status.signal == 9
    # Stopping again is not an error.
    assert manager.stop_container(sandbox.id, c.id, grace=2).exit_code == 137
    manager.remove_container(sandbox.id, c.id)


def test_invalid_oci_spec_gives_a_clear_error(manager: SandboxManager, sandbox: SandboxRecord) -> None:
    client = manager.client(sandbox.id)
    with pytest.raises(AgentError) as e:
        client.create_container(
            "broken", {"ociVersion": "1.0.2", "process": {"args": ["true"]}, "root": {"path": "/nope"}}
        )
    assert e.value.grpc_code == "INVALID_ARGUMENT"
    assert "root.path /nope is not a directory" in str(e.value)
    with pytest.raises(AgentError, match=r"not JSON|must be"):
        client.call(
            "CreateContainer",
            pb.CreateContainerRequest(container_id="x", oci_spec_json="{"),
            pb.CreateContainerResponse,
        )


def test_missing_image_layer_is_invalid_argument_and_leaves_nothing(
    manager: SandboxManager, sandbox: SandboxRecord, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        manager.create_container(sandbox.id, "nolayer", lower_dirs=[tmp_path / "missing"], process=sh("true"))
    assert "nolayer" not in manager.get_sandbox(sandbox.id).containers
    assert not (manager.sandbox_dir(sandbox.id) / "shared" / "containers" / "nolayer").exists()


def test_destroy_releases_every_host_resource(manager: SandboxManager, busybox_layer: Path) -> None:
    record = manager.create_sandbox(hostname="short-lived")
    c = manager.create_container(record.id, lower_dirs=[busybox_layer], process=sh("sleep 600"))
    manager.start_container(record.id, c.id)
    sandbox_dir, run_dir = manager.sandbox_dir(record.id), manager.run_dir(record.id)
    assert processes_mentioning(record.vm_name)
    # Everything the guest can write to on the host is inert for host processes.
    shared = sandbox_dir / "shared"
    for mount_point in (shared, shared / "containers", shared / "mounts"):
        assert {"nodev", "nosuid"} <= mount_options(mount_point)
    # The rootfs is disks: nothing of it is mounted on the host; the writable layer is a file
    # only root can open.
    assert not (shared / "containers" / c.id).exists()
    disk = sandbox_dir / "disks" / f"{c.id}.ext4"
    assert stat.S_IMODE(disk.stat().st_mode) == 0o600 and disk.stat().st_blocks > 0
    assert virtiofsd.running_for(shared)
    manager.destroy_sandbox(record.id)
    assert processes_mentioning(record.vm_name) == [] and virtiofsd.running_for(shared) == []
    assert mounts_below(sandbox_dir) == []
    assert not sandbox_dir.exists() and not run_dir.exists()
    assert manager.hypervisor.info(record.vm_name) is None
    # Destroying again is not an error.
    manager.destroy_sandbox(record.id)


def test_a_guest_that_never_answers_times_out_naming_the_sandbox_with_its_console(manager: SandboxManager) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as e:
        manager.create_sandbox(
            "never-ready", cmdline_extra=("kvmsandbox.exec=/bin/busybox,sleep,600",), ready_timeout=25
        )
    assert time.monotonic() - t0 < 90
    message = str(e.value)
    assert "sandbox never-ready" in message
    assert "kvmsandbox-init: switch_root" in message  # the console tail
    assert processes_mentioning("kvmsandbox-never-ready") == []
    assert processes_mentioning(str(manager.sandbox_dir("never-ready"))) == []  # its virtiofsd
    assert not manager.sandbox_dir("never-ready").exists()


def test_a_guest_that_powers_off_fails_fast(manager: SandboxManager) -> None:
    t0 = time.monotonic()
    with pytest.raises((Unavailable, DeadlineExceeded)) as e:
        manager.create_sandbox("no-root", cmdline_extra=("kvmsandbox.root=/dev/vdz",), ready_timeout=120)
    assert time.monotonic() - t0 < 60
    assert "root device /dev/vdz did not appear" in str(e.value)
    assert processes_mentioning(str(manager.sandbox_dir("no-root"))) == []
    assert not manager.sandbox_dir("no-root").exists()


def test_unknown_ids_are_not_found(manager: SandboxManager, sandbox: SandboxRecord) -> None:
    with pytest.raises(KvmSandboxError) as e:
        manager.start_container(sandbox.id, "no-such-container")
    assert e.value.grpc_code == "NOT_FOUND"
    with pytest.raises(KvmSandboxError) as e:
        manager.client("no-such-sandbox")
    assert e.value.grpc_code == "NOT_FOUND"


def test_host_paths_are_shared_into_containers_read_only_where_asked(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello").write_text("from the host\n")
    conf = tmp_path / "app.conf"
    conf.write_text("key=value\n")
    c = manager.create_container(
        sandbox.id,
        lower_dirs=[busybox_layer],
        process=sh("sleep 600"),
        mounts=[HostMount(data, "/data", readonly=True), HostMount(conf, "/etc/app.conf")],
    )
    try:
        manager.start_container(sandbox.id, c.id)
        assert manager.exec_sync(sandbox.id, c.id, ["cat", "/data/hello", "/etc/app.conf"]).stdout == (
            b"from the host\nkey=value\n"
        )
        denied = manager.exec_sync(sandbox.id, c.id, ["sh", "-c", "echo x > /data/new"])
        assert denied.exit_code != 0 and b"Read-only file system" in denied.stderr
        assert not (data / "new").exists()
    finally:
        manager.stop_container(sandbox.id, c.id, grace=0)
        manager.remove_container(sandbox.id, c.id)
    assert not mounts_inside(manager.sandbox_dir(sandbox.id) / "shared" / "mounts")


def test_a_guest_makes_no_device_node_in_a_writable_host_path(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "rw"
    shared.mkdir()
    c = manager.create_container(
        sandbox.id, lower_dirs=[busybox_layer], process=sh("sleep 600"), mounts=[HostMount(shared, "/w")]
    )
    try:
        manager.start_container(sandbox.id, c.id)
        # The container may make device nodes in its own disk (it has CAP_MKNOD), not through virtiofsd.
        own = manager.exec_sync(sandbox.id, c.id, ["sh", "-c", "mknod /tmp/blk b 8 0 && echo made"])
        assert own.stdout == b"made\n", own.stderr
        script = "mknod /w/blk b 8 0; mknod /w/chr c 1 3; mkfifo /w/fifo; echo data > /w/file"
        manager.exec_sync(sandbox.id, c.id, ["sh", "-c", script])
        assert (shared / "file").read_text() == "data\n"
        made = {p.name: p.lstat().st_mode for p in shared.iterdir()}
        assert not [n for n, mode in made.items() if stat.S_ISBLK(mode) or stat.S_ISCHR(mode)], made
    finally:
        manager.stop_container(sandbox.id, c.id, grace=0)
        manager.remove_container(sandbox.id, c.id)


def test_resource_updates_reach_the_guest_cgroup(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    c = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("sleep 600"))
    try:
        manager.start_container(sandbox.id, c.id)
        manager.update_container_resources(sandbox.id, c.id, {"memory": {"limit": 64 << 20}})
        assert manager.container_stats(sandbox.id, c.id).memory_limit_bytes == 64 << 20
    finally:
        manager.stop_container(sandbox.id, c.id, grace=0)
        manager.remove_container(sandbox.id, c.id)


def test_a_restarted_manager_recovers_sandboxes_and_stop_keeps_their_records(
    manager: SandboxManager, busybox_layer: Path
) -> None:
    record = manager.create_sandbox(hostname="survivor")
    again: SandboxManager | None = None
    try:
        c = manager.create_container(
            record.id,
            lower_dirs=[busybox_layer],
            process=sh("i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done"),
        )
        done = manager.create_container(record.id, lower_dirs=[busybox_layer], process=sh("exit 4"))
        manager.start_container(record.id, c.id)
        # A new manager over the same state, as after a restart of the runtime (the old one lets
        # go of its agent connections: a virtio-serial port serves one host connection).
        manager.close()
        again = SandboxManager(manager.config, manager.hypervisor, manager.image)
        again.recover()
        again.start_container(record.id, done.id)
        assert again.wait_container(record.id, done.id, 30) is not None
        assert again.refresh(record.id).containers[done.id].exit_code == 4
        lines_before = len(log_lines(c.log_path))
        assert again.exec_sync(record.id, c.id, ["hostname"]).stdout == b"survivor\n"
        wait_until(
            lambda: len(log_lines(c.log_path)) > lines_before + 2,
            30,
            "output to keep reaching the log after recovery",
            interval=0.3,
        )

        again.stop_sandbox(record.id)
        again.stop_sandbox(record.id)
        stopped = again.get_sandbox(record.id)
        assert stopped.state is SandboxState.STOPPED
        assert stopped.containers[c.id].state is ContainerState.EXITED and stopped.containers[c.id].exit_code == 137
        assert processes_mentioning(record.vm_name) == []
        with pytest.raises(KvmSandboxError) as e:
            again.create_container(record.id, lower_dirs=[busybox_layer], process=sh("true"))
        assert e.value.grpc_code == "FAILED_PRECONDITION"
        again.remove_container(record.id, c.id)
        assert c.id not in again.get_sandbox(record.id).containers
    finally:
        if again is not None:
            again.close()
        manager.destroy_sandbox(record.id)
    assert not manager.sandbox_dir(record.id).exists()


def test_port_forward_through_the_agent_when_the_pod_has_no_network(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    import threading

    from kvmsandbox.agent.streams import PortStream

    c = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("nc -ll -p 8081 -e cat"))
    try:
        manager.start_container(sandbox.id, c.id)
        wait_until(
            lambda: b":8081" in manager.exec_sync(sandbox.id, c.id, ["netstat", "-ltn"]).stdout, 60, "nc to listen"
        )
        conn = manager.open_port(sandbox.id, 8081)
        assert isinstance(conn, PortStream)  # no pod network: no relay
        payload = bytes(range(256)) * 4096
        sender = threading.Thread(target=conn.write, args=(payload, threading.Event(), True))
        sender.start()
        got, eof = b"", False
        while not eof:
            data, eof = conn.read()
            got += data
        sender.join(60)
        assert got == payload
        conn.close()
        with pytest.raises(AgentError, match="not found"):
            conn.read()
        with pytest.raises(AgentError, match=r"cannot connect to 127\.0\.0\.1:9") as e:
            manager.open_port(sandbox.id, 9)
        assert e.value.grpc_code == "UNAVAILABLE"
    finally:
        manager.stop_container(sandbox.id, c.id, grace=0)
        manager.remove_container(sandbox.id, c.id)

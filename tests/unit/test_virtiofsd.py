"""The per-pod virtio-fs daemon: its options, finding it again by what it serves, stopping it."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor import virtiofsd

needs_virtiofsd = pytest.mark.skipif(virtiofsd.find() is None, reason="no virtiofsd on this host")


def test_options_export_the_dir_without_xattrs_or_host_locks() -> None:
    opts = virtiofsd.options(Path("/var/lib/kvmsandbox/sandboxes/a/shared")).split(",")
    assert opts[0] == "source=/var/lib/kvmsandbox/sandboxes/a/shared"
    assert {"sandbox=namespace", "announce_submounts", "no_xattr", "no_posix_lock", "no_flock"} <= set(opts)
    assert "modcaps=-mknod:-setfcap" in opts


@pytest.mark.parametrize("source", ["/a,b/shared", "relative/shared"])
def test_a_source_that_would_change_the_options_is_refused(source: str) -> None:
    with pytest.raises(HypervisorError, match="absolute path without ','"):
        virtiofsd.options(Path(source))


def fake_process(proc: Path, pid: int, *args: str) -> None:
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")


def test_only_a_virtiofsd_serving_exactly_that_dir_is_found(tmp_path: Path) -> None:
    fake_process(tmp_path, 10, "/usr/lib/qemu/virtiofsd", "--fd=3", "-o", "source=/s/a/shared,cache=auto")
    fake_process(tmp_path, 11, "/usr/lib/qemu/virtiofsd", "--fd=3", "-o", "source=/s/a/shared2,cache=auto")
    fake_process(tmp_path, 12, "/usr/bin/sleep", "-o", "source=/s/a/shared,cache=auto")
    fake_process(tmp_path, 13, "/usr/lib/qemu/virtiofsd", "--fd=3", "-o", "source=/s/b/shared,cache=auto")
    (tmp_path / "self").mkdir()
    assert virtiofsd.running_for(Path("/s/a/shared"), tmp_path) == [10]
    assert not virtiofsd.serves(99, Path("/s/a/shared"), tmp_path)


@pytest.fixture
def source() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ks-vfs-", dir="/tmp") as d:
        yield Path(d)


@needs_virtiofsd
def test_a_daemon_qemu_never_connected_to_is_stopped_and_its_socket_is_private(source: Path) -> None:
    shared = source / "shared"
    shared.mkdir()
    sock = source / "fs.sock"
    pid = virtiofsd.start(shared, sock)
    try:
        assert os.stat(sock).st_mode & 0o777 == 0o600
        deadline = time.monotonic() + 5
        while pid not in virtiofsd.running_for(shared) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pid in virtiofsd.running_for(shared)
        # An unrelated process that names the same dir is left alone.
        bystander = subprocess.Popen(["sh", "-c", "sleep 30", f"source={shared},"])
        virtiofsd.stop(shared, source)
        assert virtiofsd.running_for(shared) == [] and bystander.poll() is None
        bystander.kill()
        bystander.wait()
        virtiofsd.stop(shared, source)  # idempotent
    finally:
        subprocess.run(["kill", "-9", str(pid)], capture_output=True)


@needs_virtiofsd
@needs_virtiofsd
def test_a_daemon_stopped_before_it_has_execd_is_found_by_its_recorded_start(source: Path) -> None:
    shared = source / "shared"
    shared.mkdir()
    # Still the cgroup-joining shell when stop() comes: not yet a virtiofsd by its command line.
    procs = source / "cgroup.procs"
    procs.write_text("")
    pid = virtiofsd.start(shared, source / "fs.sock", (procs,))
    virtiofsd.stop(shared, source)
    assert virtiofsd.running_for(shared) == []
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] in "ZX"


@needs_virtiofsd
def test_the_daemon_exits_by_itself_when_its_vmm_disconnects(source: Path) -> None:
    shared = source / "shared"
    shared.mkdir()
    sock = source / "fs.sock"
    virtiofsd.start(shared, sock)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(sock))
    time.sleep(0.3)
    client.close()
    deadline = time.monotonic() + 10
    while virtiofsd.running_for(shared) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert virtiofsd.running_for(shared) == []

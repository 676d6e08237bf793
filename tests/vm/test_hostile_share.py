"""A hostile guest and its share, on both backends (real guests).

A container writes a setuid binary and a device node into its rootfs (a disk image); then the
share, which holds only the pod's host paths, is changed the way
a guest root's 9p writes change it (links at the names of containers not yet created and at a
live container's dirs, a mounted rootfs renamed away), and containers are created and removed and
the pod removed. Nothing outside the pod is touched, and nothing the guest made is usable by
another host user."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.errors import FailedPrecondition
from kvmsandbox.host import nsattach
from kvmsandbox.host.mounts import mount_table
from kvmsandbox.hypervisor import virtiofsd
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.types import HostMount
from tests.vm.leaks import mounts_inside
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

PLANT = (
    "cp /bin/busybox /suid && chmod 4755 /suid && mknod -m 666 /null2 c 1 3 && mkfifo /fifo && touch /done; sleep 600"
)


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "canary"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "canary", str(d)], check=True)
    (d / "precious").write_text("keep me")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def canary_intact(canary: Path) -> bool:
    mounted = any(m.mount_point == str(canary) for m in mount_table())
    return mounted and sorted(os.listdir(canary)) == ["precious"] and (canary / "precious").read_text() == "keep me"


def special_files_below(root: Path) -> list[str]:
    """Setuid/setgid files, device nodes, FIFOs and sockets below ``root`` (links not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            regular = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID) or not regular:
                found.append(os.path.join(dirpath, name))
    return found


def as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), user=65534, group=65534, extra_groups=[], capture_output=True, check=False)


def test_a_hostile_guest_reaches_nothing_outside_its_pod(
    manager: SandboxManager, busybox_layer: Path, canary: Path, tmp_path: Path
) -> None:
    before = {(m.id, m.mount_point) for m in mount_table()}
    data = tmp_path / "data"
    data.mkdir()
    record = manager.create_sandbox(hostname="hostile")
    sdir = manager.sandbox_dir(record.id)
    shared = sdir / "shared"
    try:
        c = manager.create_container(
            record.id,
            lower_dirs=[busybox_layer],
            process=ProcessSpec(args=["sh", "-c", PLANT]),
            mounts=[HostMount(data, "/data", readonly=False)],
        )
        manager.start_container(record.id, c.id)
        wait_until(
            lambda: manager.exec_sync(record.id, c.id, ["test", "-e", "/done"]).exit_code == 0, 60, "the guest's files"
        )
        # What the guest wrote is in its disk image, a file only root can open: no setuid binary
        # and no device node of the guest's exists on the host.
        assert special_files_below(sdir) == []
        # The state dir only lets VMMs pass through (to libvirt's files for them); what is in it
        # is private.
        state = manager.config.state_dir
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o711
        for entry in state.iterdir():
            mode = stat.S_IMODE(entry.lstat().st_mode)
            assert entry.name == "libvirt" or mode & 0o077 == 0 or (entry.is_file() and mode & 0o022 == 0), entry
        assert stat.S_IMODE(os.stat(sdir).st_mode) == 0o700
        denied = as_nobody("/bin/cat", str(sdir / "disks" / f"{c.id}.ext4"))
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr

        # Links where an earlier release put rootfs overlays (the host no longer looks there) and
        # where the host will put the next container's host path.
        os.symlink(canary, shared / "containers" / "next")
        os.symlink("/", shared / "mounts" / "later@0")
        unbothered = manager.create_container(
            record.id, "next", lower_dirs=[busybox_layer], process=ProcessSpec(args=["true"])
        )
        manager.remove_container(record.id, unbothered.id)
        with pytest.raises(FailedPrecondition, match="symbolic links"):
            manager.create_container(
                record.id,
                "later",
                lower_dirs=[busybox_layer],
                process=ProcessSpec(args=["true"]),
                mounts=[HostMount(data, "/data", readonly=True)],
            )
        # A live container's host path cannot be moved away (a mount point in a mount point), and
        # links at the other names the host looks at on removal lead nowhere. The host path is
        # mounted in the virtio-fs daemon's namespace only, where the guest's renames happen.
        daemon = nsattach.other_namespace(virtiofsd.running_for(shared))
        assert daemon is not None
        # As the daemon renames for the guest: in its namespace (no binaries there, hence Python).
        rename = (
            "import ctypes, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "assert ctypes.CDLL(None).setns(fd, 0x20000) == 0; os.rename(sys.argv[2], '/mounts/stolen')"
        )
        moved = subprocess.run(
            [sys.executable, "-c", rename, f"/proc/{daemon}/ns/mnt", f"/mounts/{c.id}@0"],
            capture_output=True,
            check=False,
        )
        assert moved.returncode != 0 and b"busy" in moved.stderr.lower(), moved.stderr
        assert not any(m.mount_point.startswith(str(shared / "mounts") + "/") for m in mount_table())
        for name in ("containers", "mounts"):
            with pytest.raises(OSError) as e:
                os.rename(shared / name, (shared / name).parent / "stolen")
            assert e.value.errno == errno.EBUSY
        os.symlink("/", shared / "mounts" / c.id)
        os.symlink(canary, shared / "mounts" / f"{c.id}@7")
        manager.stop_container(record.id, c.id, grace=0)
        manager.remove_container(record.id, c.id)
        assert canary_intact(canary)
        assert sorted(mounts_inside(shared)) == sorted([str(shared / "mounts"), str(shared / "containers")])
    finally:
        manager.destroy_sandbox(record.id)
    assert not sdir.exists()
    assert {(m.id, m.mount_point) for m in mount_table()} == before
    assert canary_intact(canary) and list(data.iterdir()) == []

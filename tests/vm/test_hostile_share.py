"""A hostile guest and its share, on both backends (real guests).

A container writes a setuid binary and a device node through 9p; then the share is changed the way
a guest root's 9p writes change it (links at the names of containers not yet created and at a
live container's dirs, a mounted rootfs renamed away), and containers are created and removed and
the pod removed. Nothing outside the pod is touched, and nothing the guest made is usable by
another host user."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.errors import FailedPrecondition
from kvmsandbox.host.mounts import mount_table
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.types import HostMount
from tests.vm.leaks import mount_options, mounts_inside
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

# The 9p server refuses device nodes today (ENXIO); if one is ever made it must still be inert.
PLANT = "cp /bin/busybox /suid && chmod 4755 /suid; mknod /null2 c 1 3 && chmod 666 /null2; touch /done; sleep 600"


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
        upper = sdir / "layers" / c.id / "upper"
        wait_until(lambda: (upper / "done").exists(), 60, "the guest's files")
        # The setuid binary is on the host as the guest made it...
        assert os.lstat(upper / "suid").st_mode & stat.S_ISUID
        # ... out of every other user's reach, and inert where the guest sees it.
        assert stat.S_IMODE(os.stat(manager.config.state_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(sdir).st_mode) == 0o700
        denied = as_nobody("/bin/ls", str(upper / "suid"))
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        assert {"nosuid", "nodev"} <= mount_options(shared / "containers" / c.id)
        if (upper / "null2").exists():
            with pytest.raises(PermissionError):
                (shared / "containers" / c.id / "null2").open("rb")

        # Links where the host will create the next containers' dirs.
        os.symlink(canary, shared / "containers" / "next")
        os.symlink("/", shared / "mounts" / "later@0")
        with pytest.raises(FailedPrecondition, match="symbolic links"):
            manager.create_container(record.id, "next", lower_dirs=[busybox_layer], process=ProcessSpec(args=["true"]))
        with pytest.raises(FailedPrecondition, match="symbolic links"):
            manager.create_container(
                record.id,
                "later",
                lower_dirs=[busybox_layer],
                process=ProcessSpec(args=["true"]),
                mounts=[HostMount(data, "/data", readonly=True)],
            )
        # A live container's rootfs and host path cannot be moved away (they are mount points in
        # mount points), and links at the other names the host looks at on removal lead nowhere.
        for name in (f"containers/{c.id}", f"mounts/{c.id}@0", "containers", "mounts"):
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

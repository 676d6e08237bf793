"""Host paths attached in the mount namespace of the pod's virtio-fs daemon only (a stand-in here:
a process in a mount namespace of its own, a slave of ours, as virtiofsd's is): the node keeps no
copy, so the host can remove a directory a pod's mount sits on; mounts the host makes later reach
a slave; a link the guest planted at the target reaches nothing. Needs root."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.host import beneath, mounts, nsattach
from kvmsandbox.sandbox import rootfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def sdir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "sandboxes" / "sandbox"
    beneath.private_dir(d)
    rootfs.seal_shared_dir(d)
    yield d
    rootfs.remove_sandbox_dir(d)


@pytest.fixture
def holder(sdir: Path) -> Iterator[int]:
    """A process in a mount namespace of its own, made after the seal (it sees the pinned dirs)."""
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sleep", "120"])
    deadline = time.monotonic() + 10
    while nsattach.other_namespace([p.pid]) is None:
        assert time.monotonic() < deadline, "unshare did not make a namespace"
        time.sleep(0.01)
    yield p.pid
    p.kill()
    p.wait()


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A host dir, a shared bind of itself with a tmpfs at ``tmpfs/`` (as critest's volumes)."""
    vol = tmp_path / "vol"
    (vol / "tmpfs").mkdir(parents=True)
    (vol / "later").mkdir()
    subprocess.run(["mount", "--bind", vol, vol], check=True)
    subprocess.run(["mount", "--make-rshared", vol], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", vol / "tmpfs"], check=True)
    yield vol
    for target in (vol / "later", vol / "tmpfs", vol):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def mount_points(pid: int | str) -> list[str]:
    lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return [mounts.unescape_mountinfo(line.split()[4].encode()) for line in lines]


def attach(pid: int, sdir: Path, source: Path, name: str, *, slave: bool) -> int:
    tree = mounts.clone_tree(source, mounts.GUEST_WRITABLE, private=not slave)
    try:
        return nsattach.attach_in(pid, tree, str(sdir / "shared"), f"mounts/{name}", is_dir=True, slave=slave)
    finally:
        os.close(tree)


def test_the_node_keeps_no_copy_and_can_remove_what_the_pod_mount_sits_on(
    sdir: Path, holder: int, volume: Path
) -> None:
    attach(holder, sdir, volume, "c1@0", slave=False)
    target = str(sdir / "shared" / "mounts" / "c1@0")
    assert target in mount_points(holder) and f"{target}/tmpfs" in mount_points(holder)
    assert not any(p.startswith(target) for p in mount_points("self"))
    # What critest's cleanup does while the container runs: unmount, then remove the mount point.
    subprocess.run(["umount", volume / "tmpfs"], check=True)
    (volume / "tmpfs").rmdir()
    assert f"{target}/tmpfs" not in mount_points(holder)  # the kernel took the pod's copy away


def test_a_slave_gets_what_the_host_mounts_later_a_private_one_does_not(
    sdir: Path, holder: int, volume: Path, tmp_path: Path
) -> None:
    attach(holder, sdir, volume, "c2@0", slave=True)
    attach(holder, sdir, volume, "c3@0", slave=False)
    (tmp_path / "flag").mkdir()
    subprocess.run(["mount", "--bind", tmp_path / "flag", volume / "later"], check=True)
    seen = mount_points(holder)
    assert str(sdir / "shared/mounts/c2@0/later") in seen
    assert str(sdir / "shared/mounts/c3@0/later") not in seen


def test_a_link_planted_at_the_target_reaches_nothing(sdir: Path, holder: int, volume: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, sdir / "shared" / "mounts" / "c4@0")
    with pytest.raises(OSError, match="attach in the namespace"):
        attach(holder, sdir, volume, "c4@0", slave=False)
    assert not any(p.startswith(str(outside)) for p in mount_points(holder))
    with pytest.raises(OSError, match="not a host-path target"):
        tree = mounts.clone_tree(volume, mounts.GUEST_WRITABLE)
        try:
            nsattach.attach_in(holder, tree, str(sdir / "shared"), "containers/x", is_dir=True, slave=False)
        finally:
            os.close(tree)

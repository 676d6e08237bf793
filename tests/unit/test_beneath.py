"""Host path and mount operations below a directory a hostile guest writes to: every name the host
will touch is replaced by a link, a renamed directory or a deep tree, as a guest's 9p writes
would leave them, and nothing outside the directory is touched. Needs root (mounts)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.errors import FailedPrecondition
from kvmsandbox.host import beneath, mounts
from kvmsandbox.sandbox import rootfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs elsewhere on the host, with a file in it: what a guest would love to unmount or delete."""
    d = tmp_path / "canary"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "canary", str(d)], check=True)
    (d / "precious").write_text("keep me")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def sdir(tmp_path: Path) -> Iterator[Path]:
    """A sandbox dir, removed with whatever mounts a failing test left in it."""
    d = tmp_path / "sandbox"
    beneath.private_dir(d)
    yield d
    rootfs.remove_sandbox_dir(d)


def canary_intact(canary: Path) -> bool:
    return (
        any(m.mount_point == str(canary) for m in mounts.mount_table())
        and (canary / "precious").read_text() == "keep me"
    )


def test_make_dirs_refuses_a_link_at_any_step_and_a_path_out(tmp_path: Path, canary: Path) -> None:
    (tmp_path / "a").mkdir()
    os.symlink(canary, tmp_path / "a" / "b")
    with beneath.opened_dir(tmp_path) as fd:
        with pytest.raises(OSError) as e:
            beneath.make_dirs(fd, "a/b/c")
        assert e.value.errno == errno.ELOOP
        with pytest.raises(OSError):
            beneath.make_dirs(fd, "../escape")
        with pytest.raises(OSError):
            beneath.make_file(fd, "a/b")
        os.close(beneath.make_dirs(fd, "a/ok/deeper"))
        os.mkfifo(tmp_path / "a" / "fifo")
        with pytest.raises(OSError, match="not a regular file"):
            beneath.make_file(fd, "a/fifo")  # not opened: a FIFO would block the caller
        os.close(beneath.make_file(fd, "a/ok/file"))
        os.close(beneath.make_file(fd, "a/ok/file"))
    assert (tmp_path / "a" / "ok" / "deeper").is_dir()
    assert os.listdir(canary) == ["precious"]


def test_remove_never_follows_links_and_handles_a_tree_deeper_than_any_fd_limit(tmp_path: Path, canary: Path) -> None:
    root = tmp_path / "layer"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for depth in range(5000):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
        if depth % 1000 == 0:
            os.symlink(canary, "to-canary", dir_fd=fd)
            os.symlink(canary / "precious", "to-file", dir_fd=fd)
    os.close(fd)
    with beneath.opened_dir(tmp_path) as top:
        beneath.remove(top, "layer")
        beneath.remove(top, "layer")  # idempotent
    assert not root.exists()
    assert canary_intact(canary)


def test_remove_leaves_a_mount_point_and_what_is_below_it(tmp_path: Path, canary: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "file").write_text("x")
    subprocess.run(["mount", "--bind", str(canary), str(tree / "sub")], check=True)
    try:
        with beneath.opened_dir(tmp_path) as top, pytest.raises(OSError) as e:
            beneath.remove(top, "tree")
        assert e.value.errno == errno.EBUSY
        assert not (tree / "file").exists() and (tree / "sub" / "precious").exists()
    finally:
        subprocess.run(["umount", str(tree / "sub")], check=True)
    assert canary_intact(canary)


def test_mountinfo_names_with_spaces_tabs_newlines_and_backslashes_are_read_back(tmp_path: Path) -> None:
    assert mounts.unescape_mountinfo(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert mounts.unescape_mountinfo("/plain\\") == "/plain\\"
    odd = tmp_path / "we ird\tna\nme\\x"
    odd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "odd", str(odd)], check=True)
    try:
        assert [m.mount_point for m in mounts.mounts_below(tmp_path)] == [str(odd)]
    finally:
        subprocess.run(["umount", str(odd)], check=True)


def test_a_read_only_host_path_is_read_only_all_the_way_down(tmp_path: Path, sdir: Path) -> None:
    rootfs.seal_shared_dir(sdir)
    source = tmp_path / "source"
    (source / "inner").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "inner", str(source / "inner")], check=True)
    try:
        mid = rootfs.bind_host_path(sdir, "c1", 0, rootfs.HostPath(source, readonly=True))
        seen = sdir / "shared" / "mounts" / "c1" / "0"
        for path in (seen / "top", seen / "inner" / "below"):
            with pytest.raises(OSError) as e:
                path.write_text("x")
            assert e.value.errno == errno.EROFS
        rootfs.release_container(sdir, "c1", [mid])
        assert not (sdir / "shared" / "mounts" / "c1").exists()
        assert (source / "inner").is_mount()
    finally:
        subprocess.run(["umount", "-R", str(source / "inner")], check=False)
        rootfs.remove_sandbox_dir(sdir)
    assert not sdir.exists() and mounts.mounts_below(sdir) == []


def test_links_planted_at_every_name_the_host_uses_reach_nothing_outside(
    tmp_path: Path, canary: Path, sdir: Path
) -> None:
    """As a guest's 9p writes would leave the share: the next container's dirs are links to the
    canary, a mounted rootfs is renamed away and a link put in its place; then containers are
    created, removed and the sandbox removed."""
    rootfs.seal_shared_dir(sdir)
    shared = sdir / "shared"
    image = tmp_path / "image"
    image.mkdir()
    (image / "bin").write_text("an image layer")
    before = {m.id for m in mounts.mount_table()}

    rootfs_id = rootfs.mount_rootfs(sdir, "c1", [image])
    os.rename(shared / "containers" / "c1", shared / "elsewhere")
    os.symlink(canary, shared / "containers" / "c1")
    (shared / "mounts").mkdir()
    os.symlink("/", shared / "mounts" / "c1")
    rootfs.release_container(sdir, "c1", [rootfs_id])
    assert rootfs_id not in {m.id for m in mounts.mount_table()}
    assert canary_intact(canary)

    os.symlink(canary, shared / "containers" / "c2")
    with pytest.raises(FailedPrecondition, match="Too many levels of symbolic links"):
        rootfs.mount_rootfs(sdir, "c2", [image])
    os.unlink(shared / "containers" / "c2")
    os.symlink(canary, shared / "mounts" / "c3")
    with pytest.raises(FailedPrecondition):
        rootfs.bind_host_path(sdir, "c3", 0, rootfs.HostPath(tmp_path, readonly=False))
    assert canary_intact(canary) and os.listdir(canary) == ["precious"]

    rootfs.mount_rootfs(sdir, "c4", [image])
    os.rename(shared / "containers", shared / "moved")
    os.symlink(canary, shared / "containers")
    rootfs.remove_sandbox_dir(sdir)
    assert not sdir.exists()
    assert {m.id for m in mounts.mount_table()} <= before
    assert canary_intact(canary) and os.listdir(canary) == ["precious"]


def test_the_shared_dir_is_nodev_nosuid_and_private_to_root(sdir: Path) -> None:
    rootfs.seal_shared_dir(sdir)
    (entry,) = [m for m in mounts.mount_table() if m.mount_point == str(sdir / "shared")]
    assert {"nodev", "nosuid"} <= _mount_options(entry.id)
    assert os.stat(sdir).st_mode & 0o777 == 0o700
    rootfs.remove_sandbox_dir(sdir)
    assert not sdir.exists() and mounts.mounts_below(sdir) == []


def _mount_options(mount_id: int) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if int(fields[0]) == mount_id:
                return set(fields[5].split(","))
    raise AssertionError(f"no mount {mount_id}")

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

from kvmsandbox.errors import FailedPrecondition, InvalidArgument
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
    d = tmp_path / "sandboxes" / "sandbox"
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
    assert mounts.unescape_mountinfo(rb"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert mounts.unescape_mountinfo(b"/plain\\") == "/plain\\"
    odd = tmp_path / "we ird\tna\nme\\x\rcarriage"
    odd.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "odd", str(odd)], check=True)
    try:
        assert [m.mount_point for m in mounts.mounts_below(tmp_path)] == [str(odd)]
    finally:
        subprocess.run(["umount", str(odd)], check=True)


@pytest.fixture
def shared_source(tmp_path: Path) -> Iterator[Path]:
    """A host path on a shared mount (as / is on a systemd host) with a tmpfs below it."""
    top = tmp_path / "host"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "host", str(top)], check=True)
    subprocess.run(["mount", "--make-shared", str(top)], check=True)
    (top / "inner").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "inner", str(top / "inner")], check=True)
    yield top
    subprocess.run(["umount", "-R", "-l", str(top)], check=False)


def test_a_read_only_host_path_is_read_only_all_the_way_down_and_shares_nothing_back(
    shared_source: Path, sdir: Path
) -> None:
    rootfs.seal_shared_dir(sdir)
    mid = rootfs.bind_host_path(sdir, "c1", 0, rootfs.HostPath(shared_source, readonly=True))
    seen = sdir / "shared" / "mounts" / "c1@0"
    for path in (seen / "top", seen / "inner" / "below"):
        with pytest.raises(OSError) as e:
            path.write_text("x")
        assert e.value.errno == errno.EROFS
    # A mount the host makes below the path later does not reach the guest (it would be writable).
    (shared_source / "late").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "late", str(shared_source / "late")], check=True)
    assert not (seen / "late").is_mount()
    rootfs.release_container(sdir, "c1", [mid])
    assert not seen.exists()
    # Detaching the pod's copy never unmounts the host's own mounts.
    assert (shared_source / "inner").is_mount() and (shared_source / "late").is_mount()
    rootfs.remove_sandbox_dir(sdir)
    assert (shared_source / "inner").is_mount()
    assert not sdir.exists() and mounts.mounts_below(sdir) == []


def test_mount_points_cannot_be_moved_by_the_guest(tmp_path: Path, sdir: Path) -> None:
    rootfs.seal_shared_dir(sdir)
    shared = sdir / "shared"
    layers = []
    for i in range(6):  # more than the 255-byte limit of a string option would allow
        layer = tmp_path / ("layer-with-a-long-name-" * 4 + str(i))
        layer.mkdir()
        (layer / f"file{i}").write_text(str(i))
        layers.append(layer)
    rootfs.mount_rootfs(sdir, "c1", layers)
    assert sorted(os.listdir(shared / "containers" / "c1")) == [f"file{i}" for i in range(6)]
    for name in ("containers/c1", "containers", "mounts"):
        with pytest.raises(OSError) as e:
            os.rename(shared / name, (shared / name).parent / "moved")
        assert e.value.errno == errno.EBUSY


def test_links_planted_at_every_name_the_host_uses_reach_nothing_outside(
    tmp_path: Path, canary: Path, sdir: Path
) -> None:
    """As a guest's 9p writes would leave the share: the next containers' names are links to the
    canary or to /, a dir is left where a host path goes; then containers are created and removed
    and the sandbox removed."""
    rootfs.seal_shared_dir(sdir)
    shared = sdir / "shared"
    image = tmp_path / "image"
    image.mkdir()
    (image / "bin").write_text("an image layer")
    before = {m.id for m in mounts.mount_table()}

    rootfs_id = rootfs.mount_rootfs(sdir, "c1", [image])
    os.symlink("/", shared / "mounts" / "c1@0")
    os.symlink(canary, shared / "mounts" / "c1@1")
    (shared / "mounts" / "c1@2").mkdir()
    rootfs.release_container(sdir, "c1", [rootfs_id])
    assert rootfs_id not in {m.id for m in mounts.mount_table()}
    assert sorted(os.listdir(shared / "mounts")) == [] and canary_intact(canary)

    os.symlink(canary, shared / "containers" / "c2")
    with pytest.raises(FailedPrecondition, match="Too many levels of symbolic links"):
        rootfs.mount_rootfs(sdir, "c2", [image])
    os.symlink(canary, shared / "mounts" / "c3@0")
    with pytest.raises(FailedPrecondition):
        rootfs.bind_host_path(sdir, "c3", 0, rootfs.HostPath(tmp_path / "image", readonly=False))
    with pytest.raises(InvalidArgument, match="sandbox dirs"):
        rootfs.bind_host_path(sdir, "c4", 0, rootfs.HostPath(sdir / "shared", readonly=True))
    assert canary_intact(canary) and os.listdir(canary) == ["precious"]

    rootfs.mount_rootfs(sdir, "c5", [image])
    rootfs.remove_sandbox_dir(sdir)
    assert not sdir.exists()
    assert {m.id for m in mounts.mount_table()} <= before
    assert canary_intact(canary) and os.listdir(canary) == ["precious"]


def test_the_shared_dir_is_nodev_nosuid_shared_with_no_other_host_mount_and_private_to_root(sdir: Path) -> None:
    rootfs.seal_shared_dir(sdir)
    groups = []
    for rel in ("shared", "shared/containers", "shared/mounts"):
        (entry,) = [m for m in mounts.mount_table() if m.mount_point == str(sdir / rel)]
        assert {"nodev", "nosuid"} <= _mount_options(entry.id)
        (group,) = [f for f in _optional_fields(entry.id) if f.startswith("shared:")]
        groups.append(group)
    # Each is its own peer group: a mount made below it shows up in virtiofsd's namespace only.
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    peers = [f for line in mountinfo for f in line.split(" - ")[0].split()[6:]]
    assert all(peers.count(g) == 1 for g in groups) and len(set(groups)) == 3
    assert os.stat(sdir).st_mode & 0o777 == 0o700
    rootfs.remove_sandbox_dir(sdir)
    assert not sdir.exists() and mounts.mounts_below(sdir) == []


def _optional_fields(mount_id: int) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")[0].split()
            if int(fields[0]) == mount_id:
                return fields[6:]
    raise AssertionError(f"no mount {mount_id}")


def _mount_options(mount_id: int) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if int(fields[0]) == mount_id:
                return set(fields[5].split(","))
    raise AssertionError(f"no mount {mount_id}")


def test_tree_usage_is_bounded_and_never_leaves_the_tree(tmp_path: Path, canary: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "to-root").symlink_to("/")
    (upper / "to-canary").symlink_to(canary)
    deep = upper
    for _ in range(200):  # deeper than the walk goes
        deep = deep / "d"
    deep.mkdir(parents=True)
    (upper / "data").write_bytes(b"x" * 1_000_000)
    usage = beneath.tree_usage(tmp_path, "upper")
    assert not usage.complete and 64 <= usage.entries <= 70 and usage.used_bytes >= 1_000_000
    wide = tmp_path / "wide"
    wide.mkdir()
    for i in range(500):
        (wide / str(i)).touch()
    capped = beneath.tree_usage(tmp_path, "wide", max_entries=100)
    assert (capped.entries, capped.complete) == (100, False)
    assert beneath.tree_usage(tmp_path, "missing").entries == 0
    assert canary_intact(canary)


def test_a_removed_sandbox_goes_through_the_trash_and_leftovers_are_emptied_later(tmp_path: Path, sdir: Path) -> None:
    rootfs.seal_shared_dir(sdir)
    (sdir / "state.json").write_text("{}")
    rootfs.remove_sandbox_dir(sdir)
    assert not sdir.exists() and os.listdir(tmp_path / "trash") == []
    # What a crash (or a busy mount) left in the trash goes at the next start.
    left = tmp_path / "trash" / "old.1234" / "layers" / "c" / "upper"
    left.mkdir(parents=True)
    (left / "f").write_text("guest data")
    rootfs.empty_trash(tmp_path / "sandboxes")
    assert os.listdir(tmp_path / "trash") == []


def test_a_share_made_by_an_earlier_release_gets_its_pinned_binds_on_first_use(tmp_path: Path, sdir: Path) -> None:
    """Before, only the share itself was sealed: a new container in such a pod pins the dir first."""
    (sdir / "shared" / "containers").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(sdir / "shared"), str(sdir / "shared")], check=True)
    image = tmp_path / "image"
    image.mkdir()
    rootfs.mount_rootfs(sdir, "c1", [image])
    points = {m.mount_point for m in mounts.mount_table()}
    assert {str(sdir / "shared" / "containers"), str(sdir / "shared" / "containers" / "c1")} <= points
    with pytest.raises(OSError) as e:
        os.rename(sdir / "shared" / "containers", sdir / "shared" / "moved")
    assert e.value.errno == errno.EBUSY
    rootfs.remove_sandbox_dir(sdir)
    assert mounts.mounts_below(sdir) == []

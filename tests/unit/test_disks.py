"""Container disks: the descriptions both backends send, target allocation, layer images."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from kvmsandbox.errors import InvalidArgument, ResourceExhausted
from kvmsandbox.hypervisor import disks as hv_disks
from kvmsandbox.hypervisor.disks import Disk
from kvmsandbox.image.blocks import erofs_image, layer_of
from kvmsandbox.sandbox import disks
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord
from kvmsandbox.sandbox.states import ContainerState, SandboxState


def record_with(layers: dict[str, int], writable: list[int]) -> SandboxRecord:
    r = SandboxRecord(
        id="s", vm_name="vm", backend="qemu", accel="tcg", transport="virtio-serial",
        vcpus=1, memory_mib=256, hostname="h", state=SandboxState.READY,
    )  # fmt: skip
    r.layer_disks = dict(layers)
    for i, t in enumerate(writable):
        r.containers[f"c{i}"] = ContainerRecord(
            id=f"c{i}", sandbox_id="s", name="c", state=ContainerState.CREATED, args=[], lower_dirs=[],
            layer_keys=list(layers), writable_target=t,
        )  # fmt: skip
    return r


def test_free_targets_skip_every_disk_in_use_lowest_first() -> None:
    r = record_with({"a": 1, "b": 3}, [2, 5])
    assert disks.free_targets(r, 3) == [4, 6, 7]


def test_a_full_controller_is_resource_exhausted_naming_the_sandbox() -> None:
    r = record_with({str(t): t for t in range(1, 254)}, [254])
    with pytest.raises(ResourceExhausted, match="sandbox s has no room for 1 more disks"):
        disks.free_targets(r, 1)


def test_records_keep_the_disks_across_a_restart() -> None:
    r = record_with({"/layers/a": 1}, [2])
    again = SandboxRecord.from_json(json.loads(json.dumps(r.to_json())))
    assert again.layer_disks == {"/layers/a": 1}
    assert again.containers["c0"].writable_target == 2 and again.containers["c0"].layer_keys == ["/layers/a"]


@pytest.mark.parametrize("target", [0, 255, -1])
def test_a_disk_outside_the_targets_is_refused(target: int) -> None:
    with pytest.raises(InvalidArgument, match="outside 1-254"):
        Disk(target, Path("/x"), readonly=True)


def test_qmp_attach_opens_nothing_itself_and_detach_undoes_every_step() -> None:
    attach = hv_disks.qmp_attach(Disk(3, Path("/secret/path.ext4"), readonly=False), fdset=3)
    assert "/secret" not in json.dumps(attach)
    assert attach[0]["arguments"]["filename"] == "/dev/fdset/3"
    device = attach[-1]["arguments"]
    assert (device["driver"], device["scsi-id"], device["lun"], device["werror"]) == ("scsi-hd", 3, 0, "report")
    detach = hv_disks.qmp_detach(3, fdset=3)
    assert [c["execute"] for c in detach] == ["device_del", "blockdev-del", "blockdev-del", "remove-fd"]


def test_layer_files_belong_to_their_layer() -> None:
    assert layer_of(Path("/s/layers/abc")) == "abc"
    assert layer_of(Path("/s/layers/abc.erofs")) == "abc"
    assert layer_of(Path("/s/layers/.abc.1f2e.tmp")) == "abc"


def test_a_layer_image_is_made_once_private_and_keeps_owners_modes_and_special_files(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "bin").mkdir(parents=True)
    (layer / "bin" / "tool").write_text("x")
    os.chmod(layer / "bin" / "tool", 0o4755)
    os.chown(layer / "bin" / "tool", 1234, 5678)
    os.mknod(layer / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # an overlay whiteout
    os.symlink("/etc/shadow", layer / "link")
    image = erofs_image(layer)
    assert image == tmp_path / "layer.erofs"
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    mtime = image.stat().st_mtime_ns
    assert erofs_image(layer) == image and image.stat().st_mtime_ns == mtime

    def inode(path: str) -> str:
        return subprocess.run(["dump.erofs", f"--path={path}", str(image)], capture_output=True, text=True).stdout

    assert "Uid: 1234   Gid: 5678" in inode("/bin/tool")
    assert "char dev" in inode("/gone")
    assert "Size: 11 " in inode("/link") and "symlink" in inode("/link")


def test_a_missing_layer_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        erofs_image(tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []


def test_a_writable_layer_is_a_sparse_private_ext4_file(tmp_path: Path) -> None:
    path = tmp_path / "disks" / "c.ext4"
    baseline = disks.make_writable(path, 1024)
    st = path.stat()
    assert st.st_size == 1 << 30 and stat.S_IMODE(st.st_mode) == 0o600
    assert 0 < baseline == st.st_blocks * 512 < 16 << 20
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    kind = subprocess.run(["dumpe2fs", "-h", str(path)], capture_output=True, text=True)
    assert "Filesystem magic number:  0xEF53" in kind.stdout


def test_a_leftover_writable_layer_of_a_create_cut_short_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "disks" / "c.ext4"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"guest data from before")
    disks.make_writable(path, 64)
    assert path.stat().st_size == 64 << 20


def test_targets_go_round_so_a_target_just_freed_is_reused_last() -> None:
    r = record_with({"a": 1}, [])
    assert disks.free_targets(r, 2) == [2, 3] and r.last_target == 3
    # 2 and 3 were freed again at once: the next disks go after them, and the count wraps.
    assert disks.free_targets(r, 1) == [4]
    r.last_target = 253
    assert disks.free_targets(r, 3) == [254, 2, 3]


class DetachRecorder:
    def __init__(self) -> None:
        self.detached: list[int] = []

    def detach_disk(self, name: str, target: int) -> None:
        self.detached.append(target)


def test_unused_layers_stay_attached_until_the_pod_runs_short_of_targets() -> None:
    from types import SimpleNamespace

    hv = DetachRecorder()
    ctx = SimpleNamespace(hypervisor=hv)
    r = record_with({"used": 1, "unused": 2}, [3])
    disks.release_layers(ctx, r)  # type: ignore[arg-type]
    assert hv.detached == [] and set(r.layer_disks) == {"used", "unused"}
    r.containers["c0"].layer_keys = ["used"]
    for t in range(4, 4 + 254 - 3 - disks.SPARE_TARGETS + 1):
        r.layer_disks[f"busy{t}"] = t
        r.containers[f"x{t}"] = ContainerRecord(
            id=f"x{t}", sandbox_id="s", name="x", state=ContainerState.CREATED, args=[], lower_dirs=[],
            layer_keys=[f"busy{t}"],
        )  # fmt: skip
    disks.release_layers(ctx, r)  # type: ignore[arg-type]
    assert hv.detached == [2] and "unused" not in r.layer_disks and "used" in r.layer_disks

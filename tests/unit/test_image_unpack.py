"""Layer unpacking on the real filesystem (as root): whiteouts, ownership, links, devices, escapes."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from kvmsandbox.image import ContentError
from kvmsandbox.image.unpack import unpack_layer
from tests.registry import make_layer, sha256


def entry(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def raw_tar(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def unpack(tmp_path: Path, blob: bytes, diff_id: str | None = None) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    dest = tmp_path / "layer"
    unpack_layer(path, dest, diff_id or sha256(blob))
    return dest


def test_oci_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    layer = make_layer(whiteouts=["etc/gone", "top"], opaque_dirs=["var/opq"], compression="none")

    dest = unpack(tmp_path, layer.blob)

    for name in ("etc/gone", "top"):
        st = (dest / name).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert not (dest / "etc/.wh.gone").exists()
    assert os.getxattr(dest / "var/opq", "trusted.overlay.opaque") == b"y"
    assert not (dest / "var/opq/.wh..wh..opq").exists()


def test_owners_modes_times_links_and_devices_are_kept(tmp_path: Path) -> None:
    blob = raw_tar(
        (entry("./", tarfile.DIRTYPE, mode=0o755), b""),
        (entry("bin", tarfile.DIRTYPE, mode=0o711, uid=7, gid=8, mtime=1000), b""),
        (entry("bin/tool", mode=0o4755, uid=1234, gid=5678, mtime=2000), b"#!/bin/sh\n"),
        (entry("bin/same", tarfile.LNKTYPE, linkname="bin/tool"), b""),
        (entry("bin/abs", tarfile.SYMTYPE, linkname="/etc/passwd", uid=3, gid=4), b""),
        (entry("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
        (entry("run/fifo", tarfile.FIFOTYPE, mode=0o600), b""),
        (entry("ro", tarfile.DIRTYPE, mode=0o555), b""),
        (entry("ro/file", mode=0o444), b"x"),
    )

    dest = unpack(tmp_path, blob)

    tool = (dest / "bin/tool").stat()
    assert (tool.st_uid, tool.st_gid, stat.S_IMODE(tool.st_mode)) == (1234, 5678, 0o4755)
    assert tool.st_mtime == 2000
    assert (dest / "bin/same").stat().st_ino == tool.st_ino
    assert os.readlink(dest / "bin/abs") == "/etc/passwd"
    assert (dest / "bin/abs").lstat().st_uid == 3
    bin_ = (dest / "bin").stat()
    assert (bin_.st_uid, stat.S_IMODE(bin_.st_mode), bin_.st_mtime) == (7, 0o711, 1000)
    null = (dest / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO((dest / "run/fifo").lstat().st_mode)
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert (dest / "ro/file").read_text() == "x"


def test_a_later_entry_of_the_same_name_wins(tmp_path: Path) -> None:
    blob = raw_tar((entry("a"), b"first"), (entry("a", tarfile.SYMTYPE, linkname="b"), b""), (entry("c"), b"1"))

    dest = unpack(tmp_path, blob)

    assert os.readlink(dest / "a") == "b"


def test_safe_xattrs_are_kept_and_overlay_xattrs_ignored(tmp_path: Path) -> None:
    info = entry("f")
    info.pax_headers = {"SCHILY.xattr.user.note": "hello", "SCHILY.xattr.trusted.overlay.redirect": "/etc"}

    dest = unpack(tmp_path, raw_tar((info, b"")))

    assert os.getxattr(dest / "f", "user.note") == b"hello"
    assert "trusted.overlay.redirect" not in os.listxattr(dest / "f")


@pytest.mark.parametrize(
    "entries",
    [
        [(entry("../evil"), b"x")],
        [(entry("a/../../evil"), b"x")],
        [(entry("ok", tarfile.LNKTYPE, linkname="../../etc/passwd"), b"")],
    ],
    ids=["dotdot", "nested-dotdot", "hardlink-out"],
)
def test_entries_leaving_the_layer_are_refused(tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with pytest.raises(ContentError, match="outside the layer"):
        unpack(tmp_path, raw_tar(*entries))
    assert not (tmp_path / "evil").exists()


def test_writing_through_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    blob = raw_tar((entry("link", tarfile.SYMTYPE, linkname=str(outside)), b""), (entry("link/planted"), b"x"))

    with pytest.raises(ContentError, match="goes through the symlink link"):
        unpack(tmp_path, blob)
    assert list(outside.iterdir()) == []


def test_gzip_zstd_and_plain_layers_unpack_the_same(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_text("content")
    for compression in ("gzip", "zstd", "none"):
        layer = make_layer(src, compression=compression)
        blob = tmp_path / f"blob-{compression}"
        blob.write_bytes(layer.blob)
        usage = unpack_layer(blob, tmp_path / compression, layer.diff_id)
        assert (tmp_path / compression / "d/f").read_text() == "content"
        assert usage.inodes == 3 and usage.bytes > 0


def test_content_that_does_not_match_the_diff_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ContentError, match="digest mismatch for layer"):
        unpack(tmp_path, raw_tar((entry("f"), b"x")), diff_id="sha256:" + "0" * 64)


@pytest.mark.parametrize("name", ["a/.wh.", "a/.wh..", "a/.wh..."])
def test_whiteouts_of_no_name_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ContentError, match="not a valid whiteout"):
        unpack(tmp_path, raw_tar((entry(name), b"")))


def test_a_blob_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ContentError, match="not a valid"):
        unpack(tmp_path, b"\x1f\x8b" + b"garbage" * 100)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def test_crafted_headers_are_refused_before_they_cost_memory(tmp_path: Path) -> None:
    """A global pax header tarfile would copy into every member, a chain of long-name headers it
    would recurse on, and a sparse file whose holes would be written out uncounted."""
    glob = tarfile.TarInfo("glob")
    glob.type = tarfile.XGLTYPE
    body = b"".join(f"{len(f'{k} v') + 1 + len(str(len(f'{k} v')))} {k} v\n".encode() for k in range(2000))
    glob.size = len(body)
    crafted = {
        "global": glob.tobuf(format=tarfile.USTAR_FORMAT) + _padded(body),
        "chain": b"".join(_long_name(f"n{i}") for i in range(20)),
        "sparse": _sparse_header(),
    }
    why = {"global": "global pax header", "chain": "extended headers in a row", "sparse": "sparse files"}
    for what, header in crafted.items():
        blob = header + raw_tar((entry("after"), b"x"))
        (tmp_path / what).mkdir()
        with pytest.raises(ContentError, match=why[what]):
            unpack(tmp_path / what, blob)


def _long_name(name: str) -> bytes:
    data = name.encode() + b"\0"
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = len(data)
    return info.tobuf(format=tarfile.GNU_FORMAT) + _padded(data)


def _sparse_header() -> bytes:
    info = tarfile.TarInfo("holes")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 0
    return info.tobuf(format=tarfile.GNU_FORMAT)

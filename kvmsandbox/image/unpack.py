"""Unpacks one image layer (a tar, plain, gzip or zstd) into a directory used as an overlay lowerdir.

OCI whiteouts become overlayfs whiteouts: ``.wh.NAME`` a 0/0 character device NAME, ``.wh..wh..opq``
the ``trusted.overlay.opaque=y`` xattr on its directory. Entries are written with their owners, modes,
times and safe xattrs; none may leave the directory, by ``..`` or through a symlink.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kvmsandbox.config import ImageLimits
from kvmsandbox.errors import ContentError, LimitExceeded

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# An image may carry file capabilities and user xattrs; never overlay's own (trusted.overlay.*),
# which would let a layer redirect lookups to other paths.
_ALLOWED_XATTRS = ("user.", "security.capability")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class LayerUsage:
    bytes: int
    inodes: int


class _HashingReader:
    """Hashes what the tar reader consumes, so the diff_id is checked without a second pass, and
    stops a stream that decompresses to more than ``limit`` bytes (a compression bomb)."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.limit = limit
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n if n >= 0 else 1 << 20)
        self.total += len(data)
        if self.total > self.limit:
            raise LimitExceeded(
                f"the layer unpacks to more than {self.limit} bytes (registry.limits.max_unpacked_layer_bytes)"
            )
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _limited_tarinfo(max_header: int) -> type[tarfile.TarInfo]:
    """A TarInfo that refuses, before tarfile reads them into memory: a pax or GNU long-name header
    larger than ``max_header``, a global pax header larger than MAX_GLOBAL_HEADER (tarfile copies
    it into every later member), a chain of more than MAX_HEADER_CHAIN headers for one member
    (tarfile recurses on each), and sparse files (their holes would be written out uncounted)."""

    class LimitedTarInfo(tarfile.TarInfo):
        chain = 0

        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type in _HEADER_TYPES and self.size > max_header:
                raise LimitExceeded(
                    f"a tar header of {self.size} bytes exceeds {max_header} (registry.limits.max_tar_header_bytes)"
                )
            if self.type == tarfile.XGLTYPE and self.size > MAX_GLOBAL_HEADER:
                raise LimitExceeded(f"a global pax header of {self.size} bytes exceeds {MAX_GLOBAL_HEADER}")
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise ContentError(f"sparse file {self.name!r}: sparse files are not accepted in image layers")
            LimitedTarInfo.chain += 1
            try:
                if LimitedTarInfo.chain > MAX_HEADER_CHAIN:
                    raise ContentError(f"more than {MAX_HEADER_CHAIN} extended headers in a row")
                member = super()._proc_member(tarfile_)  # type: ignore[misc]
            finally:
                LimitedTarInfo.chain -= 1
            if getattr(member, "sparse", None) is not None:
                raise ContentError(f"sparse file {member.name!r}: sparse files are not accepted in image layers")
            return member  # type: ignore[no-any-return]

    return LimitedTarInfo


MAX_GLOBAL_HEADER = 4096
MAX_HEADER_CHAIN = 8
_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


@contextlib.contextmanager
def _decompressed(blob: Path) -> Iterator[IO[bytes]]:
    with blob.open("rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(_GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw) as gz:
                yield gz  # type: ignore[misc]
        elif magic == _ZSTD_MAGIC:
            with _zstd(blob) as stream:
                yield stream
        else:
            yield raw


@contextlib.contextmanager
def _zstd(blob: Path) -> Iterator[IO[bytes]]:
    try:
        import zstandard  # type: ignore[import-not-found]  # optional; the zstd program is the fallback
    except ImportError:
        zstandard = None
    if zstandard is not None:
        with blob.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            yield stream
        return
    program = shutil.which("zstd")
    if program is None:
        raise ContentError(
            "the layer is zstd-compressed and neither the python zstandard module nor the zstd program is installed"
        )
    with blob.open("rb") as raw:
        proc = subprocess.Popen([program, "-dcq"], stdin=raw, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        yield proc.stdout
    except BaseException:
        proc.kill()
        raise
    finally:
        proc.stdout.close()
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise ContentError(f"the layer's zstd stream is corrupt: {err.decode(errors='replace').strip()}")


def unpack_layer(blob: Path, dest: Path, diff_id: str, limits: ImageLimits | None = None) -> LayerUsage:
    """Unpacks the layer ``blob`` into the new directory ``dest`` and checks the uncompressed
    content's sha256 against ``diff_id``. On failure ``dest`` may hold a partial tree: the caller
    unpacks into a temporary directory and deletes it.

    Raises:
        ContentError: a corrupt or unsafe archive, a diff_id mismatch, a whiteout that cannot be made.
        LimitExceeded: more bytes, entries or a larger header than ``limits`` allow.
    """
    limits = limits or ImageLimits()
    dest.mkdir(mode=0o755)
    dirs: list[tuple[Path, tarfile.TarInfo]] = []
    try:
        with _decompressed(blob) as stream:
            reader = _HashingReader(stream, limits.max_unpacked_layer_bytes)
            tarinfo = _limited_tarinfo(limits.max_tar_header_bytes)
            with tarfile.open(fileobj=reader, mode="r|", tarinfo=tarinfo) as tar:  # type: ignore[call-overload]
                for count, member in enumerate(tar, 1):
                    if count > limits.max_layer_entries:
                        raise LimitExceeded(
                            f"the layer has more than {limits.max_layer_entries} entries "
                            "(registry.limits.max_layer_entries)"
                        )
                    _extract(tar, member, dest, dirs)
                    tar.members = []  # a stream keeps no list of what it has seen
            reader.drain()
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ContentError(f"the layer is not a valid (compressed) tar archive: {e}") from None
    except OSError as e:
        raise ContentError(f"cannot unpack the layer: {e}") from None
    got = f"sha256:{reader.sha256.hexdigest()}"
    if got != diff_id:
        raise ContentError(f"digest mismatch for layer {diff_id}: the uncompressed content's sha256 is {got}")
    # Directories get their modes and times last: writing their entries changed the times, and a
    # read-only directory would have refused its entries.
    for path, member in reversed(dirs):
        if not path.is_symlink() and path.is_dir():
            _set_attributes(path, member)
    return tree_usage(dest)


def _target(dest: Path, name: str, create_parents: bool) -> Path | None:
    """The path of entry ``name`` below ``dest`` (None for the root itself), its parents made as needed.

    Raises:
        ContentError: ``..`` in the name, or a parent that is a symlink or not a directory.
    """
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ContentError(f"layer entry {name!r} points outside the layer: refusing the layer")
    if not parts:
        return None
    path = dest
    for part in parts[:-1]:
        path = path / part
        try:
            st = path.lstat()
        except FileNotFoundError:
            if not create_parents:
                raise ContentError(f"layer entry {name!r} refers to a missing path") from None
            path.mkdir(mode=0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise ContentError(
                f"layer entry {name!r} goes through the symlink {path.relative_to(dest)}: refusing the layer"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise ContentError(f"layer entry {name!r} is below {path.relative_to(dest)}, which is not a directory")
    return path / parts[-1]


def _clear(path: Path, keep_dir: bool) -> None:
    """Removes what a later entry of the same name replaces (a tar may repeat names; the last wins)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not keep_dir:
            shutil.rmtree(path)
    else:
        path.unlink()


def _extract(
    tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, dirs: list[tuple[Path, tarfile.TarInfo]]
) -> None:
    path = _target(dest, member.name, create_parents=True)
    if path is None:
        if member.isdir():
            dirs.append((dest, member))
        return
    base = path.name
    if base == OPAQUE:
        os.setxattr(path.parent, OPAQUE_XATTR, b"y")
        return
    if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
        # Other AUFS metadata (.wh..wh.plnk, .wh..wh.aufs) has no meaning for overlay.
        return
    if base.startswith(WHITEOUT_PREFIX):
        _make_whiteout(path, member)
        return
    _clear(path, keep_dir=member.isdir())
    if member.isdir():
        path.mkdir(mode=0o700, exist_ok=True)
        dirs.append((path, member))
        _set_xattrs(path, member)
        return
    if _make_entry(tar, member, dest, path):
        _set_attributes(path, member)
        _set_xattrs(path, member)


def _make_whiteout(path: Path, member: tarfile.TarInfo) -> None:
    """Makes the overlay whiteout (a 0/0 character device) for the OCI whiteout ``.wh.NAME`` at ``path``.

    Raises:
        ContentError: NAME is empty, "." or "..", or the device cannot be made.
    """
    name = path.name[len(WHITEOUT_PREFIX) :]
    if name in ("", ".", ".."):
        raise ContentError(f"layer entry {member.name!r} is not a valid whiteout")
    hidden = path.with_name(name)
    _clear(hidden, keep_dir=False)
    try:
        os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    except OSError as e:
        raise ContentError(f"cannot make the whiteout for {member.name!r} (needs root): {e.strerror}") from None
    _set_owner(hidden, member)


def _make_entry(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, path: Path) -> bool:
    """Makes the file, symlink, hard link or device node ``member`` at ``path``; returns whether it
    still needs its attributes (a hard link shares them, a skipped entry has none).

    Raises:
        ContentError: a hard link to something that is not a file of the layer.
    """
    if member.isfile():
        src = tar.extractfile(member)
        assert src is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    elif member.issym():
        os.symlink(member.linkname, path)
    elif member.islnk():
        source = _target(dest, member.linkname, create_parents=False)
        if source is None or not os.path.lexists(source) or stat.S_ISDIR(source.lstat().st_mode):
            raise ContentError(
                f"layer entry {member.name!r} is a hard link to {member.linkname!r}, which is not a file here"
            )
        os.link(source, path, follow_symlinks=False)
        return False  # a hard link shares its inode's attributes, already set
    elif member.ischr() or member.isblk() or member.isfifo():
        kind = stat.S_IFIFO if member.isfifo() else stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        try:
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        except PermissionError:
            log.warning("layer entry %s: cannot make device nodes here, skipping it", member.name)
            return False
    else:
        log.warning("layer entry %s: unsupported tar entry type %r, skipping it", member.name, member.type)
        return False
    return True


def _set_owner(path: Path, member: tarfile.TarInfo) -> None:
    if os.geteuid() == 0:
        os.chown(path, member.uid, member.gid, follow_symlinks=False)


def _set_attributes(path: Path, member: tarfile.TarInfo) -> None:
    _set_owner(path, member)
    if not member.issym():
        # After chown, which clears setuid and setgid bits.
        os.chmod(path, member.mode & 0o7777)
    with contextlib.suppress(OSError):
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def _set_xattrs(path: Path, member: tarfile.TarInfo) -> None:
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        name = key[len("SCHILY.xattr.") :]
        if not name.startswith(_ALLOWED_XATTRS):
            log.debug("layer entry %s: ignoring xattr %s", member.name, name)
            continue
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        try:
            os.setxattr(path, name, raw, follow_symlinks=False)
        except OSError as e:
            log.warning("layer entry %s: cannot set xattr %s: %s", member.name, name, e.strerror)


def tree_usage(path: Path) -> LayerUsage:
    """Disk bytes (allocated blocks) and inodes below ``path``, each hard-linked inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [path]
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(entry.path))
    return LayerUsage(total, len(seen))

"""VM templates on disk, and loaded for cloning.

A template is named by a digest of everything its saved state depends on (the guest image's files,
the kernel command line, QEMU, the accelerator, the VM's size): a change of any of them names
another template, so a stale one is never used; it stays listed (``stale``) until removed. Layout
below the store's root (root only)::

    <key>/meta.json     what it was built from and when
    <key>/memory        the guest's RAM once the agent was up (sparse: only what the guest wrote)
    <key>/state         QEMU's device state (RAM excluded)
    .lock               held while a template is built or removed

Clones never map the file on disk: the server loads it into a memfd sealed against every write
(F_SEAL_WRITE, SHRINK, GROW, SEAL) and each clone's QEMU maps that private (copy-on-write). A clone's
QEMU, whatever a guest makes it do, can change neither the template nor any other clone's memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsandbox.errors import FailedPrecondition

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped whenever what a template holds changes meaning (its devices, say): older ones go stale."""
META_MAX_BYTES = 64 << 10
STATE_MAX_BYTES = 64 << 20
COPY_CHUNK = 1 << 20
PAGE = 4096
ZERO_PAGE = bytes(PAGE)
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class TemplateUnusable(FailedPrecondition):
    """A template on disk is missing, corrupt or does not fit; the pod boots cold instead."""


def template_key(inputs: Mapping[str, str]) -> str:
    """The template's name: a digest of ``inputs`` (what its saved state depends on)."""
    text = json.dumps({"format": FORMAT, **inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_identity(path: Path) -> str:
    """What changes when a file is replaced or rewritten: device, inode, size, mtime.

    Raises TemplateUnusable when the file cannot be read.
    """
    try:
        st = path.stat()
    except OSError as e:
        raise TemplateUnusable(f"cannot read {path}: {e.strerror}") from None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class TemplateInfo:
    key: str
    inputs: dict[str, str]
    created_at: float
    memory_mib: int
    data_bytes: int
    """How much of the guest's RAM the template holds (what clones share)."""
    state_bytes: int
    memory_sha256: str = ""
    """Of the memory's data pieces and their offsets, checked at every load."""
    state_sha256: str = ""
    """Of the device state, checked at every load."""


@dataclass
class CloneSource:
    """What one clone is started from: its own copies of the template's fds (the caller closes
    them once QEMU has its own; closing twice closes nothing the second time)."""

    key: str
    memory_fd: int
    """The sealed memfd."""
    state_fd: int
    """The device state, as loaded (a later file under the same name is another template)."""

    def close(self) -> None:
        for fd in (self.memory_fd, self.state_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.memory_fd = self.state_fd = -1


@dataclass
class LoadedTemplate:
    """A template ready to clone: its RAM in a sealed memfd and its state file open (both held
    while the server runs)."""

    info: TemplateInfo
    memory_fd: int
    state_fd: int

    def source(self) -> CloneSource:
        """Copies of the fds for one clone. Raises OSError."""
        memory = os.dup(self.memory_fd)
        try:
            return CloneSource(self.info.key, memory, os.dup(self.state_fd))
        except OSError:
            os.close(memory)
            raise

    def close(self) -> None:
        for fd in (self.memory_fd, self.state_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.memory_fd = self.state_fd = -1


def copy_data(src: int, dst: int, size: int, digest: Any = None) -> int:
    """Copies the pages of ``src``'s first ``size`` bytes that hold data (not holes, not all zero)
    to the same offsets of ``dst``, feeding each such page and its index to ``digest`` (a hashlib
    object) if given: the digest depends on the content only, however a file system stores zero
    pages. Returns the bytes copied. Raises OSError."""
    offset = copied = 0
    while offset < size:
        try:
            offset = os.lseek(src, offset, os.SEEK_DATA) // PAGE * PAGE
        except OSError:  # ENXIO: no data past offset
            break
        end = min(os.lseek(src, offset, os.SEEK_HOLE), size)
        while offset < end:
            block = os.pread(src, min(COPY_CHUNK, end - offset), offset)
            if not block:
                return copied
            copied += _copy_pages(block, offset, dst, digest)
            offset += len(block)
    return copied


def _copy_pages(block: bytes, offset: int, dst: int, digest: Any) -> int:
    """Writes the runs of non-zero pages of ``block`` (read at ``offset``); returns their bytes."""
    view = memoryview(block)
    written = 0
    run_start = -1
    for at in range(0, len(block) + PAGE, PAGE):
        page = view[at : at + PAGE] if at < len(block) else None
        data = page is not None and page != ZERO_PAGE[: len(page)]
        if data and digest is not None:
            digest.update(((offset + at) // PAGE).to_bytes(8, "little"))
            digest.update(page)
        if data and run_start < 0:
            run_start = at
        elif not data and run_start >= 0:
            os.pwrite(dst, view[run_start:at], offset + run_start)
            written += at - run_start
            run_start = -1
    return written


def _sealed_copy(path: Path, info: TemplateInfo, key: str) -> int:
    """The device state in a sealed memfd, checked against the metadata: what clones load cannot
    change after this, whatever happens to the file. Raises TemplateUnusable, OSError."""
    with open(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW), "rb") as f:
        state = f.read(STATE_MAX_BYTES + 1)
    if not 0 < len(state) <= STATE_MAX_BYTES or len(state) != info.state_bytes:
        raise TemplateUnusable(f"template {key}: its state does not have the size its metadata says")
    if hashlib.sha256(state).hexdigest() != info.state_sha256:
        raise TemplateUnusable(f"template {key}: its state does not match its checksum")
    fd = os.memfd_create(f"kvmsandbox-template-state-{key}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        written = 0
        while written < len(state):
            written += os.write(fd, state[written:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def new_memory(memory_mib: int, name: str) -> int:
    """An empty memfd of ``memory_mib`` that can be sealed later. Raises OSError."""
    fd = os.memfd_create(f"kvmsandbox-template-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, memory_mib << 20)
    except OSError:
        os.close(fd)
        raise
    return fd


class TemplateStore:
    """The templates below ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a template is built or removed (by the server or the CLI). Raises OSError."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def path(self, key: str) -> Path:
        return self.root / key

    def info(self, key: str) -> TemplateInfo | None:
        """The template's metadata, or None when it is missing or unreadable. Raises nothing."""
        meta = self.path(key) / "meta.json"
        try:
            with open(meta, "rb") as f:
                data = json.loads(f.read(META_MAX_BYTES + 1)[:META_MAX_BYTES])
            return TemplateInfo(
                key=key,
                inputs={str(k): str(v) for k, v in dict(data["inputs"]).items()},
                created_at=float(data["created_at"]),
                memory_mib=int(data["memory_mib"]),
                data_bytes=int(data["data_bytes"]),
                state_bytes=int(data["state_bytes"]),
                memory_sha256=str(data.get("memory_sha256", "")),
                state_sha256=str(data.get("state_sha256", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def list(self) -> list[TemplateInfo | str]:
        """Every template (its info, or its key when unreadable), oldest first. Raises nothing."""
        try:
            keys = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return []
        found = [self.info(k) or k for k in keys]
        return sorted(found, key=lambda t: t.created_at if isinstance(t, TemplateInfo) else 0.0)

    def install(
        self, key: str, inputs: Mapping[str, str], memory_fd: int, memory_mib: int, state: Path
    ) -> TemplateInfo:
        """Writes a built template (its RAM from ``memory_fd``, its state file moved in) under
        ``key``, atomically: a crash leaves no half template. Call with ``locked()`` held.

        Raises OSError.
        """
        work = self.root / f".new-{key}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        try:
            out = os.open(work / "memory", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(out, memory_mib << 20)
                digest = hashlib.sha256()
                data = copy_data(memory_fd, out, memory_mib << 20, digest)
                os.fsync(out)
            finally:
                os.close(out)
            os.replace(state, work / "state")
            saved = (work / "state").read_bytes()
            info = TemplateInfo(
                key, dict(inputs), time.time(), memory_mib, data, len(saved), digest.hexdigest(),
                hashlib.sha256(saved).hexdigest(),
            )  # fmt: skip
            (work / "meta.json").write_text(json.dumps(info.__dict__, indent=1) + "\n")
            self.remove(key)
            os.replace(work, self.path(key))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return info

    def load(self, key: str) -> LoadedTemplate:
        """The template in a sealed memfd, checked against its metadata.

        Raises:
            TemplateUnusable: missing, unreadable, or its files do not match its metadata.
        """
        info = self.info(key)
        if info is None:
            raise TemplateUnusable(f"template {key} is missing or its metadata is unreadable")
        directory = self.path(key)
        size = info.memory_mib << 20
        try:
            src = os.open(directory / "memory", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise TemplateUnusable(f"template {key}: cannot open its memory: {e.strerror}") from None
        fd = state_fd = -1
        try:
            state_fd = _sealed_copy(directory / "state", info, key)
            if os.fstat(src).st_size != size:
                raise TemplateUnusable(f"template {key}: its memory does not have the size its metadata says")
            fd = new_memory(info.memory_mib, key)
            digest = hashlib.sha256()
            copy_data(src, fd, size, digest)
            if digest.hexdigest() != info.memory_sha256:
                raise TemplateUnusable(f"template {key}: its memory does not match its checksum")
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException as e:
            for opened in (fd, state_fd):
                if opened >= 0:
                    os.close(opened)
            if isinstance(e, OSError):
                raise TemplateUnusable(f"template {key}: cannot load it: {e.strerror or e}") from None
            raise
        finally:
            os.close(src)
        return LoadedTemplate(info, fd, state_fd)

    def remove(self, key: str) -> bool:
        """Removes the template's files (running clones keep their memory). True if it existed.
        Raises OSError."""
        directory = self.path(key)
        if not directory.is_dir() or directory.is_symlink():
            return False
        shutil.rmtree(directory)
        return True

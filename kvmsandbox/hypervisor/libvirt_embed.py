"""The embedded libvirt driver's root directory: its qemu.conf, its URI, and the cache of libvirt's
probe of QEMU's capabilities (copied in and out, so the probe runs once per machine). No libvirt
import: tests and tools prepare roots without loading the bindings.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor.spec import UNIX_PATH_MAX

log = logging.getLogger(__name__)

# libvirt puts each domain's QMP socket at ROOT/lib/qemu/domain-<id>-<name, cut to 20>/monitor.sock.
_MONITOR_SOCKET_SUFFIX_MAX = len("/lib/qemu/domain-9999999-") + 20 + len("/monitor.sock")
EMBED_ROOT_MAX = UNIX_PATH_MAX - _MONITOR_SOCKET_SUFFIX_MAX

# Written to ROOT/etc/qemu.conf of an embed root; the reason for each line is beside it.
EMBED_QEMU_CONF = """\
# Written by kvmsandbox; rewritten on every start.
# No virtlogd here: QEMU's stdout/stderr go to a file under the root.
stdio_handler = "file"
# Each domain names its own uid and gid (a static DAC label without relabelling, see
# builder.domain_xml): libvirt changes the owner of nothing of ours; QEMU gets its files as fds or
# reads what is world-readable (the guest image). root is only the default for the capability probe.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
# No MAC driver (none here); libvirt's DAC driver is always there and applies each domain's label.
security_driver = "none"
# QEMU in a mount namespace of its own with a /dev holding only what the VM uses.
namespaces = ["mount"]
# Resource control of the VMs is ours, not libvirt's (and no systemd/machined is assumed).
cgroup_controllers = []
# QEMU's seccomp filter with every denial (obsolete, elevateprivileges, spawn, resourcecontrol).
seccomp_sandbox = 1
"""

# Where an embed root keeps libvirt's probe of QEMU's capabilities.
CAPABILITIES_DIR = Path("cache/qemu/capabilities")


def embed_uri(root: Path) -> str:
    """The URI of libvirt's embedded QEMU driver rooted at `root`. Raises nothing."""
    return "qemu:///embed?root=" + quote(str(root), safe="/")


def embed_root(uri: str) -> Path | None:
    """The root directory of an embedded-driver URI, or None for other URIs. Raises nothing."""
    parts = urlsplit(uri)
    if parts.scheme != "qemu" or parts.path != "/embed":
        return None
    roots = parse_qs(parts.query).get("root")
    return Path(roots[0]) if roots else None


def prepare_embed_root(root: Path) -> None:
    """Create `root` and write its etc/qemu.conf.

    Raises HypervisorError when the root is not absolute, too long for libvirt's monitor sockets,
    or cannot be written.
    """
    if not root.is_absolute():
        raise HypervisorError(f"libvirt embed root must be an absolute path, got {root}")
    if len(str(root).encode()) > EMBED_ROOT_MAX:
        raise HypervisorError(
            f"libvirt embed root {root} is longer than {EMBED_ROOT_MAX} bytes: "
            "libvirt's monitor socket paths below it would not fit in a unix socket address"
        )
    conf = root / "etc" / "qemu.conf"
    try:
        conf.parent.mkdir(parents=True, exist_ok=True)
        # Each VM's QEMU (a uid of its own) passes through to libvirt's files for it (its
        # domain dir, made for that uid); the root is not listable.
        os.chmod(root, 0o711)
        if not conf.exists() or conf.read_text() != EMBED_QEMU_CONF:
            conf.write_text(EMBED_QEMU_CONF)
    except OSError as e:
        raise HypervisorError(f"cannot prepare libvirt embed root {root}: {e}") from e


def secure_domain_dirs(root: Path) -> None:
    """Takes back the per-domain dirs libvirt gave each VM's uid (``lib/qemu/domain-*``: QEMU
    reads its master key there once, at start): root's again, 0711, so a QEMU cannot put a link
    in place of its monitor socket, which libvirt connects to by path when it reopens the root. A
    monitor socket that is not a socket of root's is removed: libvirt then cannot reconnect to that
    VM and stops it. Raises nothing (a dir that cannot be taken back is logged)."""
    base = root / "lib" / "qemu"
    try:
        entries = [e for e in os.scandir(base) if e.name.startswith("domain-")]
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            os.chown(path, 0, 0, follow_symlinks=False)
            os.chmod(path, 0o711, follow_symlinks=False)
            monitor = path / "monitor.sock"
            try:
                st = monitor.lstat()
            except FileNotFoundError:
                continue
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0:
                log.warning("libvirt domain dir %s: monitor.sock is not root's socket: removed", path)
                monitor.unlink()
        except OSError as e:
            log.warning("cannot take back libvirt domain dir %s: %s", path, e.strerror)


def closed_ancestor(root: Path) -> Path | None:
    """The first directory on the way to ``root`` (itself included) that other users cannot pass
    through (no o+x), or None. A VMM running as a uid of its own must reach libvirt's per-domain
    files below the root. Raises nothing."""
    for d in [*reversed(root.parents), root]:
        try:
            if not d.stat().st_mode & 0o001:
                return d
        except OSError:
            return d
    return None


def seed_capabilities(root: Path, cache: Path) -> int:
    """Copy libvirt's QEMU capability files from `cache` into embed root `root`; returns how many.

    A seeded root skips the capability probe on first use. libvirt checks each file (QEMU binary,
    libvirt version, host) and probes again if it is stale, so a stale cache costs time, not errors.
    Raises HypervisorError when a file cannot be copied.
    """
    return _copy_xml_files(cache, root / CAPABILITIES_DIR)


def save_capabilities(root: Path, cache: Path) -> int:
    """Copy the capability files libvirt probed in embed root `root` into `cache`; returns how many.

    Raises HypervisorError when a file cannot be copied.
    """
    return _copy_xml_files(root / CAPABILITIES_DIR, cache)


def _copy_xml_files(source: Path, dest: Path) -> int:
    try:
        files = sorted(source.glob("*.xml"))
        if files:
            dest.mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy2(file, dest / file.name)
    except OSError as e:
        raise HypervisorError(f"cannot copy libvirt capability files from {source} to {dest}: {e}") from e
    return len(files)

"""The libvirt backend: transient domains, by default through the embedded QEMU driver (no daemon).

The embedded driver (`qemu:///embed?root=DIR`) runs inside our process; QEMU processes it starts
outlive us, and the next open of the same root finds them again. Limits found by trying:
- one embed root per process, and the root stays locked by that process until it exits (closing
  the connection does not release it): a second process cannot open a root that is in use;
- the first open of a fresh root probes QEMU's capabilities (seconds to ~80 s, cached under
  DIR/cache/qemu/capabilities/);
- libvirt resolves the user `libvirt-qemu` at start even when qemu.conf says root, and fails if it
  does not exist (Debian creates it only in libvirt-daemon-system).
`qemu:///system` (a running libvirtd) works too: pass its URI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The embedded driver logs to stderr on every open: our deliberate choices ("security driver
# none", "tainted: high-privileges") and harmless probe failures (dmidecode, access manager).
# Failures that matter reach us as exceptions; libvirt's own errors go to a file instead,
# unless the user set LIBVIRT_LOG_OUTPUTS. libvirt reads it once, when the module is imported.
# In /run (root's alone), not /tmp: a VMM's uid could plant a link at a name in /tmp.
LIBVIRT_LOG_FILE = "/run/kvmsandbox-libvirt.log"
os.environ.setdefault("LIBVIRT_LOG_OUTPUTS", f"4:file:{LIBVIRT_LOG_FILE}")

import libvirt  # noqa: E402

from kvmsandbox.errors import HypervisorError  # noqa: E402
from kvmsandbox.host import ipc  # noqa: E402
from kvmsandbox.hypervisor import disks, libvirt_qmp  # noqa: E402
from kvmsandbox.hypervisor.builder import METADATA_NS, domain_xml  # noqa: E402
from kvmsandbox.hypervisor.capabilities import LIBVIRT_CAPABILITIES  # noqa: E402
from kvmsandbox.hypervisor.disks import Disk  # noqa: E402
from kvmsandbox.hypervisor.libvirt_embed import (  # noqa: E402
    closed_ancestor,
    embed_root,
    prepare_embed_root,
    secure_domain_dirs,
)
from kvmsandbox.hypervisor.process import read_pidfile, start_time, wait_gone  # noqa: E402
from kvmsandbox.hypervisor.spec import VMInfo, VMSpec  # noqa: E402
from kvmsandbox.hypervisor.uids import kvm_group, vmm_uid  # noqa: E402

log = logging.getLogger(__name__)

# libvirt's destroy already waits for QEMU to exit (SIGTERM, then SIGKILL); this wait is a safety net.
DESTROY_WAIT = 15.0
# Seconds a disk's unplug may take in QEMU after libvirt's detach returned.
DETACH_WAIT = 10.0

_init_lock = threading.Lock()
_initialised = False


def _init_libvirt_once() -> None:
    """Register libvirt's event loop (needed by the embedded driver) and silence its stderr printing.

    Raises HypervisorError if libvirt refuses the event loop.
    """
    global _initialised
    with _init_lock:
        if _initialised:
            return
        # Every libvirt failure reaches us as an exception; the default handler would also print it.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        if libvirt.virEventRegisterDefaultImpl() < 0:
            raise HypervisorError("libvirt: cannot register the default event loop")
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _initialised = True


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def _open_on_first_cpu(uri: str) -> Any:
    """libvirt.open(uri) with the calling thread pinned to its lowest allowed CPU.

    The embedded driver snapshots the host's CPUID on the opening thread and compares it with the
    snapshot stored in each cached capability file. Where CPUs report different CPUID data (seen
    here: the same cache is valid on CPU 0 and stale on CPU 1), opening on another CPU than the
    one that probed throws the cache away and probes QEMU again (seconds here, ~80 s elsewhere).
    Always opening on the same CPU keeps the cache valid. Raises libvirt.libvirtError.
    """
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        return libvirt.open(uri)
    finally:
        os.sched_setaffinity(0, allowed)


CGROUP_ROOT = Path("/sys/fs/cgroup")


@contextlib.contextmanager
def _thread_in_cgroups(procs_files: tuple[Path, ...]) -> Iterator[bool]:
    """Moves the calling thread into the cgroups of ``procs_files`` (cgroup v1 ``tasks`` files)
    and back afterwards; yields whether it could join every one of them."""
    if not procs_files or not all(p.with_name("tasks").exists() and p.is_relative_to(CGROUP_ROOT) for p in procs_files):
        yield False
        return
    tid = str(threading.get_native_id())
    current: dict[frozenset[str], str] = {}
    for line in Path("/proc/thread-self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        current[frozenset(controllers.split(","))] = path
    back: list[tuple[Path, Path]] = []
    try:
        for procs in procs_files:
            hierarchy = procs.relative_to(CGROUP_ROOT).parts[0]
            # /sys/fs/cgroup/cpu is often a link to the "cpu,cpuacct" mount: key by the real one.
            mounted = frozenset((CGROUP_ROOT / hierarchy).resolve().name.split(","))
            original = current.get(mounted)
            if original is None:
                yield False
                return
            home = CGROUP_ROOT / hierarchy / original.lstrip("/") / "tasks"
            procs.with_name("tasks").write_text(tid)
            back.append((procs.with_name("tasks"), home))
        yield True
    finally:
        # This thread, and any thread libvirt started from it meanwhile (the VM's event loop), go
        # home: only QEMU stays in the VMM's cgroup.
        own = {p.name for p in Path("/proc/self/task").iterdir()}
        for tasks, home in back:
            try:
                tids = [t for t in tasks.read_text().split() if t in own]
            except OSError:
                tids = [tid]
            for t in tids:
                try:
                    home.write_text(t)
                except OSError as e:
                    log.warning("could not move thread %s back to %s: %s", t, home.parent, e.strerror)


def _vmm_uid(dom: Any) -> int | None:
    """The uid the domain's QEMU runs as (its static DAC label), or None. Raises nothing."""
    try:
        label = ET.fromstring(dom.XMLDesc(0)).findtext("seclabel[@model='dac']/label") or ""
    except (libvirt.libvirtError, ET.ParseError):
        return None
    uid = label.split(":", 1)[0].lstrip("+")
    return int(uid) if uid.isdigit() else None


def _give_socket(path: Path, uid: int) -> None:
    """Lets the VM's QEMU (``uid``) connect to the runtime's socket at ``path`` (libvirt has QEMU
    connect to virtiofsd by path); nobody else may.

    Raises:
        HypervisorError: the owner could not be changed.
    """
    try:
        os.chown(path, uid, uid, follow_symlinks=False)
    except OSError as e:
        raise HypervisorError(f"cannot give {path} to the VM's QEMU: {e.strerror}") from None


class LibvirtHypervisor:
    """Runs each VM as a transient libvirt domain named after the VMSpec."""

    name = "libvirt"
    capabilities = LIBVIRT_CAPABILITIES

    def __init__(self, uri: str, *, uid_base: int = 0) -> None:
        """Connect to libvirt at `uri`; for an embed URI, prepare its root first. With `uid_base`
        each QEMU runs as a uid and gid of its own from there (uids.py); 0 leaves QEMU as libvirt's
        configured user.

        Raises HypervisorError with libvirt's message when the connection fails.
        """
        self.uri = uri
        self._uid_base = uid_base
        root = embed_root(uri)
        if root is not None:
            prepare_embed_root(root)
            closed = closed_ancestor(root) if uid_base else None
            if closed is not None:
                raise HypervisorError(
                    f"libvirt embed root {root} is out of reach of the VMMs' uids: {closed} lets no other "
                    f"user pass (mode {closed.stat().st_mode & 0o777:o}); make it 0711 or move the state dir"
                )
            self._pid_dir: Path | None = root / "run" / "qemu"
            # QEMU's stdio log per domain; libvirt appends and never removes it. Ours to clean up.
            self._log_dir: Path | None = root / "log" / "qemu"
        elif uri == "qemu:///system":
            self._pid_dir = Path("/run/libvirt/qemu")
            self._log_dir = None  # libvirtd's logs are the host's (logrotate)
        else:
            self._pid_dir = self._log_dir = None
        if root is not None:
            secure_domain_dirs(root)
        _init_libvirt_once()
        started = time.monotonic()
        try:
            self._conn: Any = _open_on_first_cpu(uri) if root is not None else libvirt.open(uri)
        except libvirt.libvirtError as e:
            hint = ""
            if "libvirt-qemu" in str(e):
                hint = " (create the user: useradd --system --user-group --no-create-home libvirt-qemu)"
            raise HypervisorError(f"libvirt: cannot open {uri}: {e}{hint}") from e
        log.info("libvirt opened uri=%s seconds=%.3f", uri, time.monotonic() - started)

    def boot(self, spec: VMSpec) -> VMInfo:
        """Create a transient domain for `spec`; returns once QEMU runs the guest's vCPUs.

        Raises HypervisorError with libvirt's message (e.g. a domain of that name exists).
        """
        started = time.monotonic()
        # The embedded driver forks QEMU from the calling thread, and a forked process starts in
        # its parent thread's cgroups: on cgroup v1 (per-thread membership) this thread joins the
        # VMM's cgroups for the call, so QEMU is accounted there from its first page. Elsewhere
        # QEMU starts paused and runs the guest once moved (what it touched while setting up stays
        # charged where it was forked: recent kernels do not move charges).
        with contextlib.ExitStack() as held:
            uid = held.enter_context(vmm_uid(self._uid_base)) if self._uid_base else None
            if uid is not None and spec.shared_fs_socket is not None:
                _give_socket(spec.shared_fs_socket, uid)
            joined = held.enter_context(_thread_in_cgroups(spec.cgroup_procs))
            flags = libvirt.VIR_DOMAIN_START_PAUSED if spec.cgroup_procs and not joined else 0
            try:
                ids = None if uid is None else (uid, kvm_group() if spec.accel == "kvm" else uid)
                dom = self._conn.createXML(domain_xml(spec, vmm_ids=ids), flags)
            except libvirt.libvirtError as e:
                # libvirt's message already quotes QEMU's stderr from the log.
                self._remove_log(spec.name)
                raise HypervisorError(f"libvirt: cannot boot VM {spec.name!r}: {e}") from e
        root = embed_root(self.uri)
        if self._uid_base and root is not None:
            secure_domain_dirs(root)
        if spec.cgroup_procs and not joined:
            try:
                self._join_cgroups(dom, spec)
            except BaseException:
                self.destroy(spec.name)
                raise
        info = self.info(spec.name) or VMInfo(spec.name, None, False)
        log.info(
            "vm booted backend=libvirt vm=%s pid=%s seconds=%.3f",
            spec.name, info.pid, time.monotonic() - started,
        )  # fmt: skip
        return info

    def _join_cgroups(self, dom: libvirt.virDomain, spec: VMSpec) -> None:
        info = self.info(spec.name)
        if info is None or not info.pid:
            raise HypervisorError(f"libvirt: VM {spec.name!r} has no QEMU process to account")
        for procs in spec.cgroup_procs:
            try:
                procs.write_text(str(info.pid))
            except OSError as e:
                raise HypervisorError(f"cannot move QEMU of VM {spec.name!r} into {procs.parent}: {e.strerror}") from e
        try:
            dom.resume()
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: cannot start the vCPUs of VM {spec.name!r}: {e}") from e

    def destroy(self, name: str) -> None:
        """Destroy the domain and wait until its QEMU process is gone. Idempotent.

        Raises HypervisorError with libvirt's message, or when QEMU outlives the destroy.
        """
        dom = self._find(name)
        vm = None if dom is None else self._describe(dom)
        if dom is None or vm is None:
            self._remove_log(name)
            return
        started = start_time(vm.pid) if vm.pid is not None else None
        uid = _vmm_uid(dom)
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            # The domain can vanish while destroy runs (QEMU exited on its own): that is success.
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise HypervisorError(f"libvirt: cannot destroy VM {name!r}: {e}") from e
        if vm.pid is not None and started is not None and not wait_gone(vm.pid, started, DESTROY_WAIT):
            raise HypervisorError(f"libvirt destroyed VM {name!r} but its QEMU (pid {vm.pid}) still runs")
        if uid is not None:
            ipc.remove_owned_by(uid)  # QEMU shares the host's IPC namespace here
        self._remove_log(name)
        log.info("vm destroyed backend=libvirt vm=%s", name)

    def list(self) -> list[VMInfo]:
        """Our domains (marked by kvmsandbox metadata) known to libvirt.

        Raises HypervisorError with libvirt's message.
        """
        try:
            domains = self._conn.listAllDomains(0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: cannot list domains: {e}") from e
        infos = [self._describe(dom) for dom in domains]
        return sorted((i for i in infos if i is not None), key=lambda i: i.name)

    def info(self, name: str) -> VMInfo | None:
        """The domain `name` if it is ours, else None. Raises HypervisorError with libvirt's message."""
        dom = self._find(name)
        return None if dom is None else self._describe(dom)

    def attach_disk(self, name: str, disk: Disk) -> None:
        """Adds ``disk`` to the running domain with QMP through libvirt, the image passed as an fd
        (libvirt_qmp.py); a target left attached by an interrupted call is cleared first.

        Raises HypervisorError with QEMU's or libvirt's message.
        """
        dom = self._find(name)
        if dom is None:
            raise HypervisorError(f"libvirt: no VM {name!r} to attach a disk to")
        try:
            fd = os.open(disk.path, (os.O_RDONLY if disk.readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise HypervisorError(f"cannot open disk image {disk.path} for VM {name!r}: {e.strerror}") from e
        stop = self._killer(name)
        try:
            self.detach_disk(name, disk.target)
            libvirt_qmp.run(dom, disks.qmp_attach(disk, libvirt_qmp.fdset(disk.target)), stop, fd=fd)
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                self._detach_ours(dom, disk.target, stop, tolerate_all=True)
            raise
        finally:
            os.close(fd)

    def detach_disk(self, name: str, target: int) -> None:
        """Removes the disk at ``target`` (SCSI: at once, no guest cooperation). Idempotent.

        Raises HypervisorError with QEMU's or libvirt's message.
        """
        dom = self._find(name)
        if dom is None:
            return
        stop = self._killer(name)
        alias = disks.libvirt_alias(target)
        try:
            if alias in libvirt_qmp.devices(dom, stop) or f"'{alias}'" in dom.XMLDesc(0):
                self._detach_legacy(dom, name, alias, stop)
            self._detach_ours(dom, target, stop)
        except libvirt_qmp.DomainGone:
            return
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_DEVICE_MISSING, *libvirt_qmp.GONE):
                return
            raise HypervisorError(f"libvirt: cannot detach disk {target} from VM {name!r}: {e}") from e

    @staticmethod
    def _detach_ours(dom: Any, target: int, stop: Callable[[], None], *, tolerate_all: bool = False) -> None:
        commands = disks.qmp_detach(target, libvirt_qmp.fdset(target))
        libvirt_qmp.run(dom, commands, stop, tolerate_all=tolerate_all)

    @staticmethod
    def _detach_legacy(dom: Any, name: str, alias: str, stop: Callable[[], None]) -> None:
        """A disk an earlier release attached through libvirt: libvirt detaches it."""
        if alias in libvirt_qmp.devices(dom, stop) and f"'{alias}'" in dom.XMLDesc(0):
            dom.detachDeviceAlias(alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        # libvirt returns before the unplug is over and forgets the disk when QEMU's event
        # reaches it: the target is free once neither has it.
        deadline = time.monotonic() + DETACH_WAIT
        while alias in libvirt_qmp.devices(dom, stop) or f"'{alias}'" in dom.XMLDesc(0):
            if time.monotonic() > deadline:
                raise HypervisorError(
                    f"libvirt: disk {alias} of VM {name!r} still there {DETACH_WAIT:.0f} s after detach"
                )
            time.sleep(0.02)

    def _killer(self, name: str) -> Callable[[], None]:
        """What stops the VM's QEMU when a call to it gets no answer: SIGKILL to the process that
        runs now (pid and start time taken here, checked again through a pidfd)."""
        pid = self._pid(name)
        started = start_time(pid) if pid else None

        def kill() -> None:
            if pid is None or started is None:
                return
            log.warning("vm does not answer QMP, killing it backend=libvirt vm=%s pid=%d", name, pid)
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                return
            try:
                if start_time(pid) == started:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)

        return kill

    def vmm_logs(self, name: str) -> tuple[Path, ...]:
        """QEMU's stdout/stderr log under the embed root (libvirt keeps it open for appending)."""
        return () if self._log_dir is None else (self._log_dir / f"{name}.log",)

    def close(self) -> None:
        """Close the connection; domains keep running. Raises nothing."""
        try:
            self._conn.close()
        except libvirt.libvirtError as e:
            log.warning("libvirt close failed uri=%s error=%s", self.uri, e)

    def _find(self, name: str) -> Any:
        try:
            return self._conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"libvirt: cannot look up VM {name!r}: {e}") from e

    def _describe(self, dom: Any) -> VMInfo | None:
        """The domain as VMInfo, or None if it is not ours or has vanished."""
        try:
            name = str(dom.name())
            running = bool(dom.isActive())
            if not self._is_ours(dom):
                return None
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # it went away while we looked
            raise HypervisorError(f"libvirt: cannot inspect a domain: {e}") from e
        return VMInfo(name, self._pid(name) if running else None, running)

    def _is_ours(self, dom: Any) -> bool:
        # Under qemu:///system libvirt may run domains that are not ours; ours carry our metadata.
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return False
            raise
        return True

    def _remove_log(self, name: str) -> None:
        if self._log_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                (self._log_dir / f"{name}.log").unlink()

    def _pid(self, name: str) -> int | None:
        return None if self._pid_dir is None else read_pidfile(self._pid_dir / f"{name}.pid")

"""The direct backend: one daemonized QEMU process per VM, stopped over QMP.

QEMU daemonizes, so VMs outlive our process. Per VM we keep, under the state dir, `<name>.json`
(where its sockets and run dir are) and `<name>.pid` (written by QEMU itself); list() and info()
read them back after a restart. Each file belongs to one VM name, so calls for different VMs need no
lock; calls for the same VM must not overlap (the sandbox layer serializes work per pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor import disks, qemu_launch, qemu_snapshot
from kvmsandbox.hypervisor.builder import QEMU_BINARY, qemu_argv
from kvmsandbox.hypervisor.capabilities import QEMU_CAPABILITIES
from kvmsandbox.hypervisor.disks import Disk
from kvmsandbox.hypervisor.process import (
    in_cgroups,
    is_qemu_of,
    launch_detached,
    read_pidfile,
    start_time,
    wait_exited,
    wait_gone,
)
from kvmsandbox.hypervisor.qmp_calls import qmp_run as _qmp_run
from kvmsandbox.hypervisor.spec import QMP_SOCKET_NAME, VMInfo, VMSpec
from kvmsandbox.hypervisor.uids import vmm_uid

log = logging.getLogger(__name__)

STDERR_LOG_NAME = "qemu-stderr.log"
# Stderr text quoted in a HypervisorError; QEMU's real complaint is in the last lines.
STDERR_TAIL_CHARS = 4000
# After SIGKILL only the kernel's teardown of QEMU's memory is left to wait for.
KILL_WAIT = 10.0
# Seconds one QMP exchange (connect, a disk's attach or detach) may take.
QMP_TIMEOUT = 15.0


@dataclass(frozen=True)
class _VMFiles:
    """Host files of one VM, recorded in `<name>.json` so a restarted process can clean them up."""

    name: str
    run_dir: str
    qmp_socket: str
    agent_socket: str | None
    # QEMU's pid and start time (together they name one process; a jailed QEMU can rewrite its
    # command line, not these) and its uid. Records of an earlier release have none: QEMU wrote
    # a pidfile and is known by its command line.
    pid: int = 0
    start_time: int = 0
    uid: int = 0


class QemuHypervisor:
    """Runs each VM as a daemonized QEMU (`qemu_binary`) with a QMP socket in its run dir."""

    name = "qemu"
    capabilities = QEMU_CAPABILITIES

    def __init__(
        self,
        state_dir: Path,
        *,
        qemu_binary: str = QEMU_BINARY,
        boot_timeout: float = 30.0,
        stop_grace: float = 3.0,
        uid_base: int = 0,
    ) -> None:
        """Keep VM state under `state_dir` (created if missing); boot VMs with `qemu_binary`, a name
        looked up in PATH or a path. With `uid_base`, each QEMU runs jailed (qemu_launch.py,
        jail.py) as a uid of its own from there; 0 runs it as this process's user (root).

        `stop_grace` is how long destroy() waits after each of QMP quit and SIGTERM before escalating.
        Raises HypervisorError when `state_dir` cannot be created.
        """
        self._dir = state_dir
        self._qemu_binary = qemu_binary
        self._boot_timeout = boot_timeout
        self._stop_grace = stop_grace
        self._uid_base = uid_base
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(state_dir, 0o700)
        except OSError as e:
            raise HypervisorError(f"cannot create qemu backend state dir {state_dir}: {e}") from e

    def boot(self, spec: VMSpec) -> VMInfo:
        """Start QEMU for `spec`; returns once QEMU has daemonized (its devices and sockets exist).

        Raises HypervisorError with QEMU's stderr when it does not start, when a VM of that name runs,
        or when the QEMU binary cannot be found.
        """
        binary = shutil.which(self._qemu_binary)
        if binary is None:
            raise HypervisorError(
                f"cannot boot VM {spec.name!r}: QEMU binary {self._qemu_binary!r} not found "
                "(install the qemu-system-x86 package or set hypervisor.qemu_binary to its path)"
            )
        current = self.info(spec.name)
        if current is not None and current.running:
            raise HypervisorError(f"VM {spec.name!r} is running already (qemu pid {current.pid})")
        if current is not None:
            self._remove_files(spec.name)

        files = _VMFiles(
            name=spec.name,
            run_dir=str(spec.run_dir),
            qmp_socket=str(spec.run_dir / QMP_SOCKET_NAME),
            agent_socket=str(spec.agent.socket_path) if spec.agent and spec.agent.socket_path else None,
        )
        # Recorded before QEMU starts, so a crash of ours right after the start still leaves a trace.
        self._write_files_record(files)
        stderr_path = spec.run_dir / STDERR_LOG_NAME
        started = time.monotonic()
        pid = head = uid = launched = 0
        try:
            with contextlib.ExitStack() as held:
                opened = held.enter_context(qemu_launch.opened_for(spec, jailed=bool(self._uid_base)))
                argv = qemu_argv(spec, opened.fds, binary=os.path.abspath(binary))
                if self._uid_base:
                    uid = held.enter_context(vmm_uid(self._uid_base))
                    argv = qemu_launch.jail_argv(spec, uid, argv)
                pid, head = launch_detached(in_cgroups(spec.cgroup_procs, argv), stderr_path, tuple(opened.owned))
                launched = start_time(pid) or -1
                files = dataclasses.replace(files, pid=pid, start_time=launched, uid=uid)
                self._write_files_record(files)
                incoming = opened.fds.incoming
                opened.close()  # QEMU has its copies: a QEMU that dies now closes the sockets
                self._wait_ready(spec.name, pid, launched, Path(files.qmp_socket), started + self._boot_timeout)
                if incoming is not None:
                    loaded = qemu_snapshot.restore(Path(files.qmp_socket), incoming, self._boot_timeout)
                    log.info("vm restored backend=qemu vm=%s load_seconds=%.3f", spec.name, loaded)
        except HypervisorError as e:
            if pid:
                self._stop(spec.name, pid, launched, None)
            if head:
                wait_exited(head, 2.0)  # what QEMU said is in the log once head has it all
            detail = _tail(stderr_path) or "no message on stderr"
            self.destroy(spec.name)
            raise HypervisorError(f"QEMU could not boot VM {spec.name!r}: {e}: {detail}") from None
        info = self.info(spec.name) or VMInfo(spec.name, None, False)
        log.info(
            "vm booted backend=qemu vm=%s pid=%s seconds=%.3f",
            spec.name, info.pid, time.monotonic() - started,
        )  # fmt: skip
        return info

    def _wait_ready(self, name: str, pid: int, started: int, qmp_socket: Path, deadline: float) -> None:
        """Returns once QEMU answers on QMP (its devices are set up by then).

        Raises:
            HypervisorError: QEMU exited, or did not answer before ``deadline``.
        """
        # Its command line changes while the launcher execs into QEMU: whether it lives is read
        # from its start time.
        while True:
            if start_time(pid) != started:
                raise HypervisorError(f"QEMU (pid {pid}) exited while starting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HypervisorError(f"QEMU (pid {pid}) did not answer on QMP within {self._boot_timeout:.0f} s")
            if qmp_socket.exists():
                try:
                    _qmp_run(qmp_socket, [{"execute": "query-status"}], timeout=min(remaining, 2.0))
                    return
                except HypervisorError:
                    pass
            time.sleep(0.01)

    def adopt(self, name: str, new_name: str, run_dir: Path) -> None:
        """Gives the running VM ``name`` (a clone waiting in the warm pool) the name and run dir
        of the sandbox it now serves: its run dir moves to ``run_dir`` (absent or empty; its
        sockets keep working), its record to ``new_name``. QEMU itself is not touched.

        Raises HypervisorError when the VM is unknown or ``new_name`` is taken.
        """
        files = self._read_files_record(name)
        if files is None:
            raise HypervisorError(f"VM {name!r} is not known to the qemu backend")
        if self._record_path(new_name).exists():
            raise HypervisorError(f"VM {new_name!r} exists already")
        try:
            os.replace(files.run_dir, run_dir)
        except OSError as e:
            raise HypervisorError(f"cannot move the run dir of VM {name!r} to {run_dir}: {e.strerror}") from None
        agent = str(run_dir / Path(files.agent_socket).name) if files.agent_socket else None
        moved = dataclasses.replace(
            files, name=new_name, run_dir=str(run_dir), qmp_socket=str(run_dir / QMP_SOCKET_NAME), agent_socket=agent
        )
        self._write_files_record(moved)
        self._record_path(name).unlink(missing_ok=True)
        log.info("vm adopted backend=qemu vm=%s was=%s", new_name, name)

    def save_state(self, name: str, state_path: Path) -> dict[str, Any]:
        """Stops the VM (a template) and writes its device state to ``state_path`` (created, mode
        0600); returns QEMU's migration report. The VM stays stopped: destroy() it next.

        Raises HypervisorError when the VM is unknown or QEMU fails.
        """
        return qemu_snapshot.save_to_file(self._qmp_socket(name), state_path, QMP_TIMEOUT)

    def destroy(self, name: str) -> None:
        """Stop the VM (QMP quit, then SIGTERM, then SIGKILL), wait for QEMU to exit, remove its files.

        Idempotent. Raises HypervisorError if QEMU survives SIGKILL.
        """
        files = self._read_files_record(name)
        if files is None and not self._pidfile(name).exists():
            return
        running = self._running(name, files)
        if running is not None:
            qmp_socket = Path(files.qmp_socket) if files else None
            self._stop(name, *running, qmp_socket)
        self._remove_files(name)
        log.info("vm destroyed backend=qemu vm=%s", name)

    def list(self) -> list[VMInfo]:
        """Every VM with a record under the state dir, running or not. Raises nothing."""
        names = sorted(path.stem for path in self._dir.glob("*.json"))
        return [info for name in names if (info := self.info(name)) is not None]

    def info(self, name: str) -> VMInfo | None:
        """The VM's state from its record and QEMU's pidfile, or None if it has no record. Raises nothing."""
        if not self._record_path(name).exists():
            return None
        running = self._running(name, self._read_files_record(name))
        return VMInfo(name, running[0], True) if running else VMInfo(name, None, False)

    def _running(self, name: str, files: _VMFiles | None) -> tuple[int, int] | None:
        """QEMU's pid and start time while it runs. Raises nothing."""
        if files is not None and files.pid:
            return (files.pid, files.start_time) if start_time(files.pid) == files.start_time else None
        pid = read_pidfile(self._pidfile(name))  # an earlier release's QEMU, known by its command line
        if pid is not None and is_qemu_of(pid, name) and (started := start_time(pid)) is not None:
            return pid, started
        return None

    def vmm_logs(self, name: str) -> tuple[Path, ...]:
        """None: QEMU's stderr goes through ``head``, which stops at STDERR_MAX_BYTES."""
        return ()

    def close(self) -> None:
        """Nothing to release: every call reads the state dir afresh."""

    def attach_disk(self, name: str, disk: Disk) -> None:
        """Adds ``disk`` to the running VM: the runtime opens the image and hands QEMU the fd (an fd
        set numbered by the target), so QEMU needs no access to the path. A target left half
        attached by an interrupted call is cleared first.

        Raises HypervisorError with QEMU's message.
        """
        flags = os.O_RDONLY if disk.readonly else os.O_RDWR
        try:
            fd = os.open(disk.path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise HypervisorError(f"cannot open disk image {disk.path} for VM {name!r}: {e.strerror}") from e
        socket = self._qmp_socket(name)
        try:
            try:
                _qmp_run(socket, disks.qmp_attach(disk, disk.target), fd=(fd, disk.target))
            except HypervisorError as e:
                if not any(word in str(e) for word in ("Duplicate", "already", "in use")):
                    raise
                # What an interrupted attach or detach left at the target: cleared, then again.
                _qmp_run(socket, disks.qmp_detach(disk.target, disk.target), tolerate_all=True)
                _qmp_run(socket, disks.qmp_attach(disk, disk.target), fd=(fd, disk.target))
        except HypervisorError:
            _qmp_run(socket, disks.qmp_detach(disk.target, disk.target), tolerate_all=True)
            raise
        finally:
            os.close(fd)

    def detach_disk(self, name: str, target: int) -> None:
        """Removes the disk at ``target`` (at once: SCSI needs no guest cooperation) and closes
        QEMU's fd of it. Idempotent.

        Raises HypervisorError with QEMU's message when QEMU refuses other than "not found".
        """
        info = self.info(name)
        if info is None or not info.running:
            return  # no VM, no disk
        _qmp_run(self._qmp_socket(name), disks.qmp_detach(target, target), tolerate_all=False)

    def _qmp_socket(self, name: str) -> Path:
        files = self._read_files_record(name)
        if files is None:
            raise HypervisorError(f"VM {name!r} is not known to the qemu backend")
        return Path(files.qmp_socket)

    def _stop(self, name: str, pid: int, started: int, qmp_socket: Path | None) -> None:
        """Stops the process ``pid`` started at ``started`` (QEMU, or the launcher about to be QEMU)."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            # Checked after taking the pidfd: from here on the signals cannot reach a reused pid.
            if start_time(pid) != started:
                return
            quit_sent = qmp_socket is not None and _qmp_quit(qmp_socket, self._stop_grace)
            if quit_sent and wait_gone(pid, started, self._stop_grace):
                return
            for sig, grace in ((signal.SIGTERM, self._stop_grace), (signal.SIGKILL, KILL_WAIT)):
                log.warning("vm still running, sending %s backend=qemu vm=%s pid=%d", sig.name, name, pid)
                if not _signal(pidfd, sig) or wait_gone(pid, started, grace):
                    return
            raise HypervisorError(f"QEMU of VM {name!r} (pid {pid}) survived SIGKILL")
        finally:
            os.close(pidfd)

    def _remove_files(self, name: str) -> None:
        files = self._read_files_record(name)
        paths = [self._pidfile(name)]
        if files is not None:
            run_dir = Path(files.run_dir)
            paths += [Path(files.qmp_socket), run_dir / STDERR_LOG_NAME]
            with contextlib.suppress(OSError):
                (run_dir / qemu_launch.JAIL_DIR_NAME).rmdir()
            if files.agent_socket:
                paths.append(Path(files.agent_socket))
        # The record goes last: while it exists, a later destroy() can still find the other files.
        paths.append(self._record_path(name))
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _pidfile(self, name: str) -> Path:
        return self._dir / f"{name}.pid"

    def _record_path(self, name: str) -> Path:
        return self._dir / f"{name}.json"

    def _write_files_record(self, files: _VMFiles) -> None:
        path = self._record_path(files.name)
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(asdict(files)))
            tmp.replace(path)
        except OSError as e:
            raise HypervisorError(f"cannot record VM {files.name!r} in {self._dir}: {e}") from e

    def _read_files_record(self, name: str) -> _VMFiles | None:
        try:
            data = json.loads(self._record_path(name).read_text())
            return _VMFiles(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("unreadable vm record backend=qemu vm=%s error=%s", name, e)
            return None


def _qmp_quit(socket_path: Path, timeout: float) -> bool:
    """Ask QEMU to quit over QMP; True if it took the command. Raises nothing."""

    async def quit_() -> None:
        client = QMPClient()
        try:
            async with asyncio.timeout(timeout):
                await client.connect(str(socket_path))
                await client.execute("quit")
        finally:
            # QEMU hangs up right after answering "quit"; the EOF is the expected outcome.
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.disconnect()

    try:
        asyncio.run(quit_())
    except (QMPError, OSError, EOFError, TimeoutError) as e:
        log.info("qmp quit failed socket=%s error=%r", socket_path, e)
        return False
    return True


def _signal(pidfd: int, sig: signal.Signals) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    return True


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text[-STDERR_TAIL_CHARS:]

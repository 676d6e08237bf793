"""The direct backend: one daemonized QEMU process per VM, stopped over QMP.

QEMU daemonizes, so VMs outlive our process. Per VM we keep, under the state dir, `<name>.json`
(where its sockets and run dir are) and `<name>.pid` (written by QEMU itself); list() and info()
read them back after a restart. Each file belongs to one VM name, so calls for different VMs need no
lock; calls for the same VM must not overlap (the sandbox layer serializes work per pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qemu.qmp import QMPClient, QMPError

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor.builder import QEMU_BINARY, qemu_argv
from kvmsandbox.hypervisor.capabilities import QEMU_CAPABILITIES
from kvmsandbox.hypervisor.process import is_qemu_of, read_pidfile, wait_gone
from kvmsandbox.hypervisor.spec import QMP_SOCKET_NAME, VMInfo, VMSpec

log = logging.getLogger(__name__)

STDERR_LOG_NAME = "qemu-stderr.log"
# Stderr text quoted in a HypervisorError; QEMU's real complaint is in the last lines.
STDERR_TAIL_CHARS = 4000
# After SIGKILL only the kernel's teardown of QEMU's memory is left to wait for.
KILL_WAIT = 10.0


@dataclass(frozen=True)
class _VMFiles:
    """Host files of one VM, recorded in `<name>.json` so a restarted process can clean them up."""

    name: str
    run_dir: str
    qmp_socket: str
    agent_socket: str | None


# Joins every cgroup given before "--" (writing its own pid to each cgroup.procs), then execs the
# command after it: the process is accounted in those cgroups from its first allocation on.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def in_cgroups(procs_files: tuple[Path, ...], argv: list[str]) -> list[str]:
    """``argv`` run by a shell that first joins the cgroups of ``procs_files``."""
    return ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *(str(p) for p in procs_files), "--", *argv]


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
    ) -> None:
        """Keep VM state under `state_dir` (created if missing); boot VMs with `qemu_binary`, a name
        looked up in PATH or a path.

        `stop_grace` is how long destroy() waits after each of QMP quit and SIGTERM before escalating.
        Raises HypervisorError when `state_dir` cannot be created.
        """
        self._dir = state_dir
        self._qemu_binary = qemu_binary
        self._boot_timeout = boot_timeout
        self._stop_grace = stop_grace
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HypervisorError(f"cannot create qemu backend state dir {state_dir}: {e}") from e

    def boot(self, spec: VMSpec) -> VMInfo:
        """Start QEMU for `spec`; returns once QEMU has daemonized (its devices and sockets exist).

        Raises HypervisorError with QEMU's stderr when it does not start, when a VM of that name runs,
        or when the QEMU binary cannot be found.
        """
        if shutil.which(self._qemu_binary) is None:
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
        argv = qemu_argv(spec, pidfile=self._pidfile(spec.name), binary=self._qemu_binary)
        if spec.cgroup_procs:
            argv = in_cgroups(spec.cgroup_procs, argv)
        stderr_path = spec.run_dir / STDERR_LOG_NAME
        started = time.monotonic()
        try:
            with stderr_path.open("wb") as stderr:
                # QEMU's parent exits once the daemonized child has set up every device, so its exit
                # status tells whether the VM started; stdio of the daemon goes to /dev/null after that.
                proc = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    timeout=self._boot_timeout, check=False,
                )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            self.destroy(spec.name)
            raise HypervisorError(f"QEMU could not boot VM {spec.name!r}: {e}") from e
        if proc.returncode != 0:
            detail = _tail(stderr_path) or "no message on stderr"
            self.destroy(spec.name)
            raise HypervisorError(f"QEMU could not boot VM {spec.name!r} (exit status {proc.returncode}): {detail}")
        info = self.info(spec.name) or VMInfo(spec.name, None, False)
        log.info(
            "vm booted backend=qemu vm=%s pid=%s seconds=%.3f",
            spec.name, info.pid, time.monotonic() - started,
        )  # fmt: skip
        return info

    def destroy(self, name: str) -> None:
        """Stop the VM (QMP quit, then SIGTERM, then SIGKILL), wait for QEMU to exit, remove its files.

        Idempotent. Raises HypervisorError if QEMU survives SIGKILL.
        """
        files = self._read_files_record(name)
        pid = read_pidfile(self._pidfile(name))
        if files is None and pid is None:
            return
        if pid is not None and is_qemu_of(pid, name):
            qmp_socket = Path(files.qmp_socket) if files else None
            self._stop(name, pid, qmp_socket)
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
        pid = read_pidfile(self._pidfile(name))
        if pid is not None and is_qemu_of(pid, name):
            return VMInfo(name, pid, True)
        return VMInfo(name, None, False)

    def close(self) -> None:
        """Nothing to release: every call reads the state dir afresh."""

    def _stop(self, name: str, pid: int, qmp_socket: Path | None) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            # Checked after taking the pidfd: from here on the signals cannot reach a reused pid.
            if not is_qemu_of(pid, name):
                return
            quit_sent = qmp_socket is not None and _qmp_quit(qmp_socket, self._stop_grace)
            if quit_sent and wait_gone(pid, name, self._stop_grace):
                return
            for sig, grace in ((signal.SIGTERM, self._stop_grace), (signal.SIGKILL, KILL_WAIT)):
                log.warning("vm still running, sending %s backend=qemu vm=%s pid=%d", sig.name, name, pid)
                if not _signal(pidfd, sig) or wait_gone(pid, name, grace):
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

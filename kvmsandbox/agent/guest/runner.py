"""Runs OCI containers with crun inside the guest. Knows nothing of the RPC layer."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from kvmsandbox.agent.guest import debug
from kvmsandbox.agent.guest.cgroup_stats import container_stats, oom_kills
from kvmsandbox.agent.guest.errors import (
    AgentFault,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from kvmsandbox.agent.guest.exec_signal import signal_exec
from kvmsandbox.agent.guest.oci_check import check_id, validate_process, validate_spec
from kvmsandbox.agent.guest.process import Exit, ExitInfo, OutputBuffer, run_command
from kvmsandbox.agent.guest.reaper import Reaper
from kvmsandbox.agent.guest.stdio import Input, Stdio, spawn_crun
from kvmsandbox.agent.guest.storage import RootfsMounts, rootfs_path
from kvmsandbox.agent.v1 import agent_pb2 as pb

CRUN_TIMEOUT = 120.0


def remove_dir(path: Path) -> None:
    """rm -rf; shutil is imported on first use because it costs the agent's start a quarter second
    under TCG (it pulls in bz2 and lzma)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class Process:
    """A container's init process or an exec process: its streams and its exit."""

    def __init__(self, pid: int, exit_: Exit, stdio: Stdio) -> None:
        self.pid = pid
        self.exit = exit_
        self.stdio = stdio
        self.stdout = stdio.stdout
        self.stderr = stdio.stderr
        self.waited = False

    def stream(self, which: int) -> OutputBuffer:
        return self.stderr if which == pb.STDERR else self.stdout

    def input(self) -> Input:
        """Raises FailedPrecondition: it was started without stdin or a terminal."""
        if self.stdio.input is None:
            raise FailedPrecondition("the process has no stdin")
        return self.stdio.input

    def close(self) -> None:
        self.stdio.close()


class Container:
    def __init__(self, container_id: str, bundle: Path, cgroup: Path, init: Process) -> None:
        self.id = container_id
        self.bundle = bundle
        self.cgroup = cgroup
        self.init = init
        self.state: pb.ContainerState.ValueType = pb.CREATED
        self.started_at_ns = 0
        self.execs: dict[str, Process] = {}


class ContainerRunner:
    """Creates, starts, execs into, signals, measures and removes crun containers."""

    def __init__(
        self,
        reaper: Reaper,
        *,
        crun: str = "crun",
        bundles: Path = Path("/run/kvmsandbox/containers"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
    ) -> None:
        self._reaper = self.reaper = reaper
        self._crun = crun
        self._bundles = bundles
        self._cgroup_root = cgroup_root
        self._lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        self.rootfs = RootfsMounts()
        # Debug shells (container id ""): processes in the guest itself, by exec id.
        self._shells: dict[str, Process] = {}

    def crun_path(self) -> str:
        """Where the OCI runtime is, or "" when it is not installed."""
        if os.sep in self._crun:
            return self._crun if os.access(self._crun, os.X_OK) else ""
        for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
            candidate = os.path.join(d, self._crun)
            if os.access(candidate, os.X_OK):
                return candidate
        return ""

    def _crun_cmd(self, bundle: Path, *args: str) -> list[str]:
        return [self._crun, f"--log=file:{bundle / 'crun.log'}", *args]

    @staticmethod
    def _crun_log_size(bundle: Path) -> int:
        """Where crun's log ends now: an error quotes only what its own command logged."""
        try:
            return (bundle / "crun.log").stat().st_size
        except OSError:
            return 0

    def _crun_error(self, bundle: Path, what: str, stderr: str, since: int = 0) -> AgentFault:
        try:
            with open(bundle / "crun.log", "rb") as f:
                f.seek(since)
                log = f.read(64 * 1024).decode(errors="replace").strip().splitlines()[-5:]
        except OSError:
            log = []
        detail = "; ".join(line for line in [*log, stderr.strip()[-4096:]] if line) or "no message"
        return AgentFault(f"{what}: {detail}")

    def get(self, container_id: str) -> Container:
        """Raises NotFound for an unknown id."""
        with self._lock:
            c = self._containers.get(container_id)
        if c is None:
            raise NotFound(f"container {container_id} not found in the guest")
        return c

    def process(self, container_id: str, exec_id: str) -> Process:
        if not container_id:
            with self._lock:
                shell = self._shells.get(exec_id)
            if shell is None:
                raise NotFound(f"debug shell {exec_id} not found in the guest")
            return shell
        c = self.get(container_id)
        if not exec_id:
            return c.init
        p = c.execs.get(exec_id)
        if p is None:
            raise NotFound(f"exec {exec_id} not found in container {container_id}")
        return p

    def create(self, container_id: str, spec_json: str, rootfs: pb.Rootfs | None = None, stdin: bool = False) -> int:
        """Creates the container (its process waits for ``start``) on ``rootfs`` (assembled here
        from the host's disks) or on the spec's root path; returns the init pid.

        Raises:
            InvalidArgument: bad id or spec. AlreadyExists: the id is taken.
            AgentFault: a disk did not mount, or crun refused; the message carries crun's words.
        """
        check_id("container id", container_id)
        spec = validate_spec(spec_json, root_made_here=rootfs is not None)
        if rootfs is not None and spec["root"]["path"] != str(rootfs_path(container_id)):
            raise InvalidArgument(f"the spec's root path must be {rootfs_path(container_id)} for a rootfs of disks")
        cgroups_path = spec.setdefault("linux", {}).setdefault("cgroupsPath", f"/kvmsandbox/{container_id}")
        bundle = self._bundles / container_id
        with self._lock:
            if container_id in self._containers:
                raise AlreadyExists(f"container {container_id} exists already")
            # A bundle without a container is a leftover of a failed create: start afresh.
            remove_dir(bundle)
            bundle.mkdir(parents=True)
            self.rootfs.unmount(container_id)
        try:
            if rootfs is not None:
                self.rootfs.mount(container_id, rootfs)
            (bundle / "config.json").write_text(json.dumps(spec))
            terminal = bool(spec["process"].get("terminal", False))
            init = self._crun_create(container_id, bundle, stdin, terminal)
        except BaseException:
            run_command(self._reaper, self._crun_cmd(bundle, "delete", "--force", container_id))
            self.rootfs.unmount(container_id)
            remove_dir(bundle)
            raise
        container = Container(container_id, bundle, self._cgroup_root / str(cgroups_path).lstrip("/"), init)
        with self._lock:
            self._containers[container_id] = container
        return init.pid

    def _crun_create(self, container_id: str, bundle: Path, stdin: bool, terminal: bool) -> Process:
        """Runs ``crun create`` for the bundle and returns the container's init process, which waits
        for ``start``; the streams crun got (or the terminal it made) stay the container's.

        Raises:
            AgentFault: crun could not run, or failed; the message carries crun's words.
        """
        pid_file = bundle / "init.pid"
        argv = self._crun_cmd(bundle, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id)
        _, crun_exit, stdio = spawn_crun(self._reaper, argv, container_id, stdin=stdin, terminal=terminal)
        info = crun_exit.wait(CRUN_TIMEOUT)
        if info is None or info.exit_code != 0 or not pid_file.exists():
            stdio.close()
            raise self._crun_error(bundle, f"crun create {container_id} failed", "")
        pid = int(pid_file.read_text().strip())
        init_exit = Exit()
        self._reaper.watch(pid, init_exit.set_status)
        return Process(pid, init_exit, stdio)

    def start(self, container_id: str) -> None:
        """Lets the created container's process run.

        Raises:
            NotFound, FailedPrecondition (not in the created state), AgentFault (crun failed).
        """
        c = self.get(container_id)
        if c.state != pb.CREATED:
            raise FailedPrecondition(f"container {container_id} was started already")
        since = self._crun_log_size(c.bundle)
        result = run_command(self._reaper, self._crun_cmd(c.bundle, "start", container_id), CRUN_TIMEOUT)
        if result.exit_code != 0:
            raise self._crun_error(c.bundle, f"crun start {container_id} failed", result.stderr, since)
        c.state = pb.RUNNING
        c.started_at_ns = time.time_ns()

    def exec(self, container_id: str, exec_id: str, process_json: str, stdin: bool = False) -> int:
        """Starts another process in a running container (``stdin``: a pipe the host writes; a
        terminal when the process asks for one); returns the pid of its ``crun exec``.

        Raises:
            InvalidArgument, NotFound, AlreadyExists, FailedPrecondition (container not running).
        """
        check_id("exec id", exec_id)
        try:
            process = validate_process(json.loads(process_json), "process")
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"invalid OCI process: not JSON ({e})") from None
        if not container_id:
            return self._start_shell(exec_id, process, stdin)
        c = self.get(container_id)
        if c.state != pb.RUNNING or c.init.exit.info is not None:
            raise FailedPrecondition(f"container {container_id} is not running")
        if exec_id in c.execs:
            raise AlreadyExists(f"exec {exec_id} exists already in container {container_id}")
        process_file = c.bundle / f"exec-{exec_id}.json"
        process_file.write_text(json.dumps(process))
        # crun exec waits for the command as its parent: a signal for the exec must reach the
        # command itself (killing crun alone would leave it running in the container).
        pid_file = c.bundle / f"exec-{exec_id}.pid"
        pid_file.unlink(missing_ok=True)
        argv = self._crun_cmd(
            c.bundle, "exec", "--pid-file", str(pid_file), "--process", str(process_file), container_id
        )
        pid, exit_, stdio = spawn_crun(
            self._reaper, argv, exec_id, stdin=stdin, terminal=bool(process.get("terminal", False))
        )
        c.execs[exec_id] = Process(pid, exit_, stdio)
        return pid

    def _start_shell(self, exec_id: str, process: dict[str, Any], stdin: bool) -> int:
        with self._lock:
            if exec_id in self._shells:
                raise AlreadyExists(f"debug shell {exec_id} exists already")
            # Shells that ended count no more, read to their end or not (a client that left).
            for gone in [k for k, p in self._shells.items() if p.exit.info is not None]:
                self._shells.pop(gone).close()
            pid, exit_, stdio = debug.start(self._reaper, exec_id, process, stdin, len(self._shells))
            self._shells[exec_id] = Process(pid, exit_, stdio)
        return pid

    def _forget_finished_shell(self, exec_id: str) -> None:
        with self._lock:
            p = self._shells.get(exec_id)
            if p is not None and p.exit.info is not None and p.stdout.finished() and p.stderr.finished():
                p.close()
                del self._shells[exec_id]

    def kill_shells(self) -> None:
        """Ends every debug shell and whatever it started (the sandbox goes away)."""
        with self._lock:
            shells = list(self._shells.values())
            self._shells.clear()
        for p in shells:
            if p.exit.info is None:
                debug.kill_session(p.pid, 9)
            p.close()

    def write_stdin(self, container_id: str, exec_id: str, data: bytes, close: bool, wait: float) -> int:
        """Writes to the process's stdin what it takes within ``wait``; closes it after all of
        ``data`` when ``close`` (not a terminal: that stays until the process ends).

        Raises:
            NotFound. FailedPrecondition: no stdin, or it is closed.
        """
        stdin = self.process(container_id, exec_id).input()
        written = stdin.write(data, wait) if data else 0
        if close and written == len(data) and not stdin.terminal:
            stdin.close()
        return written

    def resize(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        """Raises NotFound. FailedPrecondition: the process has no terminal."""
        self.process(container_id, exec_id).input().resize(width, height)

    def wait(self, container_id: str, exec_id: str, timeout: float) -> ExitInfo | None:
        """The exit of the process, waiting at most ``timeout`` seconds; None while it runs."""
        if not container_id:
            info = self.process("", exec_id).exit.wait(timeout)
            self._forget_finished_shell(exec_id)
            return info
        c = self.get(container_id)
        p = self.process(container_id, exec_id)
        info = p.exit.wait(timeout)
        if info is not None:
            if not exec_id:
                c.state = pb.EXITED
            p.waited = True
            self._forget_finished_exec(c, exec_id)
        return info

    def _forget_finished_exec(self, c: Container, exec_id: str) -> None:
        """Drops an exec once its exit was reported and its output read, so execs do not pile up."""
        p = c.execs.get(exec_id) if exec_id else None
        if p is None or not p.waited:
            return
        if p.stdout.finished() and p.stderr.finished():
            p.close()
            c.execs.pop(exec_id, None)
            (c.bundle / f"exec-{exec_id}.json").unlink(missing_ok=True)
            (c.bundle / f"exec-{exec_id}.pid").unlink(missing_ok=True)

    def read_stdio(
        self, container_id: str, exec_id: str, stream: int, at: tuple[int, int], max_bytes: int, wait: float
    ) -> tuple[bytes, int, bool]:
        """``at``: (offset, acknowledged), see OutputBuffer.read."""
        if not container_id:
            data, offset, eof = self.process("", exec_id).stream(stream).read(*at, max_bytes, wait)
            self._forget_finished_shell(exec_id)
            return data, offset, eof
        c = self.get(container_id)
        data, offset, eof = self.process(container_id, exec_id).stream(stream).read(*at, max_bytes, wait)
        if eof:
            self._forget_finished_exec(c, exec_id)
        return data, offset, eof

    def signal(self, container_id: str, exec_id: str, sig: int) -> None:
        """Sends ``sig``; a process that has exited already is left alone (stop is idempotent)."""
        if not container_id:
            shell = self.process("", exec_id)
            if shell.exit.info is None:  # alive: its pid (the session's id) is still its own
                debug.kill_session(shell.pid, sig)  # the shell and what it started
            return
        c = self.get(container_id)
        p = self.process(container_id, exec_id)
        if p.exit.info is not None:
            return
        if exec_id:
            signal_exec(p.pid, c.bundle / f"exec-{exec_id}.pid", sig)
            return
        since = self._crun_log_size(c.bundle)
        result = run_command(self._reaper, self._crun_cmd(c.bundle, "kill", container_id, str(sig)))
        if result.exit_code != 0 and c.init.exit.info is None:
            raise self._crun_error(c.bundle, f"crun kill {container_id} {sig} failed", result.stderr, since)

    def update(self, container_id: str, resources_json: str) -> None:
        """Applies new cgroup limits (an OCI ``linux.resources`` object) to a container.

        Raises:
            InvalidArgument: not a JSON object. NotFound. FailedPrecondition: it has exited.
            AgentFault: crun refused, with its words.
        """
        try:
            resources = json.loads(resources_json)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"invalid resources: not JSON ({e})") from None
        if not isinstance(resources, dict):
            raise InvalidArgument("invalid resources: must be a JSON object")
        c = self.get(container_id)
        if c.init.exit.info is not None:
            raise FailedPrecondition(f"container {container_id} has exited")
        path = c.bundle / "resources.json"
        path.write_text(json.dumps(resources))
        since = self._crun_log_size(c.bundle)
        result = run_command(self._reaper, self._crun_cmd(c.bundle, "update", "--resources", str(path), container_id))
        if result.exit_code != 0:
            raise self._crun_error(c.bundle, f"crun update {container_id} failed", result.stderr, since)

    def remove(self, container_id: str, force: bool) -> None:
        """Deletes the container and its bundle.

        Raises:
            NotFound. FailedPrecondition: it still runs and ``force`` is false.
        """
        c = self.get(container_id)
        if c.init.exit.info is None:
            if c.state == pb.RUNNING and not force:
                raise FailedPrecondition(f"container {container_id} is running: stop it first")
            run_command(self._reaper, self._crun_cmd(c.bundle, "kill", container_id, "9"))
        since = self._crun_log_size(c.bundle)
        result = run_command(self._reaper, self._crun_cmd(c.bundle, "delete", "--force", container_id))
        if result.exit_code != 0:
            raise self._crun_error(c.bundle, f"crun delete {container_id} failed", result.stderr, since)
        c.init.exit.wait(10)
        c.init.close()
        for p in c.execs.values():
            p.close()
        with self._lock:
            self._containers.pop(container_id, None)
        self.rootfs.unmount(container_id)
        remove_dir(c.bundle)

    def remove_all(self) -> None:
        """Force-removes every container (sandbox teardown)."""
        with self._lock:
            ids = list(self._containers)
        for cid in ids:
            self.remove(cid, force=True)

    def stats(self, container_id: str) -> pb.ContainerStatsResponse:
        """cgroup v2 figures of the container.

        Raises:
            NotFound: no such container.
        """
        return container_stats(self.get(container_id).cgroup)

    def list(self) -> list[pb.ContainerInfo]:
        with self._lock:
            containers = list(self._containers.values())
        out = []
        for c in containers:
            info = c.init.exit.info
            out.append(
                pb.ContainerInfo(
                    id=c.id,
                    state=pb.EXITED if info is not None else c.state,
                    pid=c.init.pid,
                    exit_code=info.exit_code if info else 0,
                    started_at_ns=c.started_at_ns,
                    finished_at_ns=info.finished_at_ns if info else 0,
                    oom_killed=info is not None and oom_kills(c.cgroup) > 0,
                )
            )
        return out

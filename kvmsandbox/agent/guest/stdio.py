"""A crun process's standard streams in the guest: pipes for its output, a pipe for its stdin when
the host writes one, or a terminal whose master crun hands over on a console socket.

With a terminal the process's output is the master (one stream, as kubelet expects of a tty) and
crun's own messages go to the stderr buffer; the master is also where stdin is written and the
window size is set.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from kvmsandbox.agent.guest.errors import AgentFault, FailedPrecondition
from kvmsandbox.agent.guest.process import Exit, OutputBuffer, spawn
from kvmsandbox.agent.guest.reaper import Reaper

CONSOLE_DIR = Path("/run/kvmsandbox/console")
# crun connects to the console socket once the process exists; a start slower than this fails.
CONSOLE_WAIT_SECONDS = 60.0
# A terminal's size is kept within what a screen can be.
MAX_TERMINAL_CELLS = 10_000
TIOCSWINSZ = 0x5414


class Input:
    """Where the host's stdin bytes go: the write end of a pipe, or a terminal's master."""

    def __init__(self, fd: int, terminal: bool) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self.terminal = terminal

    def write(self, data: bytes, wait: float) -> int:
        """Writes what the process takes within ``wait`` seconds; returns how much.

        Raises:
            FailedPrecondition: stdin is closed (the process ended or closed it).
        """
        if self._fd < 0:
            raise FailedPrecondition("stdin is closed")
        written = 0
        deadline = time.monotonic() + wait
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while written < len(data):
            try:
                written += os.write(self._fd, data[written:])
                continue
            except BlockingIOError:
                pass
            except OSError as e:  # EPIPE, EIO: nobody reads any more
                if written:
                    return written
                raise FailedPrecondition(f"stdin is closed: {e.strerror}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                break
        return written

    def resize(self, width: int, height: int) -> None:
        """Raises FailedPrecondition: not a terminal, or it is gone."""
        if not self.terminal or self._fd < 0:
            raise FailedPrecondition("the process has no terminal")
        width, height = min(width, MAX_TERMINAL_CELLS), min(height, MAX_TERMINAL_CELLS)
        import fcntl

        try:
            fcntl.ioctl(self._fd, TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
        except OSError as e:
            raise FailedPrecondition(f"cannot resize the terminal: {e.strerror}") from None

    def close(self) -> None:
        """Closes stdin: EOF for a pipe; for a terminal, the last hold on its master. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class Stdio:
    """A spawned crun's streams, as the agent keeps them."""

    __slots__ = ("input", "stderr", "stdout")

    def __init__(self, stdout: OutputBuffer, stderr: OutputBuffer, input_: Input | None) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.input = input_

    def close(self) -> None:
        self.stdout.close()
        self.stderr.close()
        if self.input is not None:
            self.input.close()


def spawn_crun(
    reaper: Reaper, argv: Sequence[str], name: str, *, stdin: bool, terminal: bool
) -> tuple[int, Exit, Stdio]:
    """Runs crun (``argv``, without ``--console-socket``: added here for a terminal) with its
    streams set up; with a terminal, returns once crun has handed over the master or has exited.

    Raises:
        AgentFault: crun could not be started, or it started nothing within CONSOLE_WAIT_SECONDS.
    """
    listener, console_path = _console_listener() if terminal else (None, None)
    argv = [*argv[:-1], "--console-socket", str(console_path), argv[-1]] if terminal else list(argv)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe() if not terminal else (out_r, out_w)
    in_r, in_w = os.pipe() if stdin and not terminal else (-1, -1)
    try:
        pid, exit_ = spawn(reaper, argv, stdout=out_w, stderr=err_w, stdin=in_r if in_r >= 0 else None)
    except OSError as e:
        for fd in {out_r, err_r, in_w}:
            if fd >= 0:
                os.close(fd)
        if listener is not None and console_path is not None:
            listener.close()
            console_path.unlink(missing_ok=True)
        raise AgentFault(f"cannot run crun: {e}") from None
    finally:
        for fd in {out_w, err_w, in_r}:
            if fd >= 0:
                os.close(fd)
    if listener is None or console_path is None:
        out = OutputBuffer(out_r, f"{name}-stdout")
        err = OutputBuffer(err_r, f"{name}-stderr")
        return pid, exit_, Stdio(out, err, Input(in_w, terminal=False) if in_w >= 0 else None)
    # crun's own messages (errors) are the "stderr" of a terminal process.
    err = OutputBuffer(out_r, f"{name}-crun")
    try:
        master = _receive_master(listener, exit_)
    finally:
        listener.close()
        console_path.unlink(missing_ok=True)
    if master < 0:
        # crun failed before it had a terminal: its output says why; stdout just ends.
        empty_r, empty_w = os.pipe()
        os.close(empty_w)
        return pid, exit_, Stdio(OutputBuffer(empty_r, f"{name}-stdout"), err, None)
    return pid, exit_, Stdio(OutputBuffer(os.dup(master), f"{name}-tty"), err, Input(master, terminal=True))


def _console_listener() -> tuple[socket.socket, Path]:
    CONSOLE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = CONSOLE_DIR / f"{os.urandom(8).hex()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
    except OSError as e:
        listener.close()
        raise AgentFault(f"cannot make a console socket: {e}") from None
    return listener, path


def _receive_master(listener: socket.socket, crun_exit: Exit) -> int:
    """The pty master crun sends on the console socket (SCM_RIGHTS); -1 when crun exited first.

    Raises:
        AgentFault: neither happened within CONSOLE_WAIT_SECONDS.
    """
    deadline = time.monotonic() + CONSOLE_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            if crun_exit.wait(0.02) is not None:
                with contextlib.suppress(BlockingIOError):
                    conn, _ = listener.accept()  # it may have sent the master and exited since
                    return _take_fd(conn)
                return -1
            continue
        return _take_fd(conn)
    raise AgentFault(f"crun did not hand over a terminal within {CONSOLE_WAIT_SECONDS:.0f}s")


def _take_fd(conn: socket.socket) -> int:
    with conn:
        conn.settimeout(5.0)
        try:
            _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        except OSError as e:
            raise AgentFault(f"no terminal from crun: {e}") from None
    for extra in fds[1:]:
        os.close(extra)
    if not fds:
        raise AgentFault("no terminal from crun: its message held no file descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]

"""The debug console: an SSH server that opens a shell (or runs a command) in a pod's guest,
outside its containers, for an operator debugging the VM.

Public keys only, from the configured authorized-keys file (read at each attempt, so a removed key
stops working at once; no file: nobody gets in). The SSH user names the pod: its id or a unique
prefix. Every attempt and session goes to the audit log with who (the key's fingerprint and
comment), which pod, when and for how long. It listens on a root-only unix socket (what
`kvmsandbox console` uses) and, when configured, on a loopback port or another unix socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
from paramiko.common import AUTH_FAILED, AUTH_SUCCESSFUL, OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED, OPEN_SUCCEEDED

from kvmsandbox.config import Config
from kvmsandbox.console.audit import AuditLog, authorized
from kvmsandbox.sandbox.interactive import ProcessIO

log = logging.getLogger(__name__)

# Per listener: the root-only socket keeps its own, whatever comes in on the others.
MAX_SESSIONS = 16
AUTH_TIMEOUT = 30.0
# Public keys one connection may offer; then it is dropped (and the log says so once).
MAX_AUTH_ATTEMPTS = 6
# A client that takes no output for this long is dropped.
SEND_TIMEOUT = 300.0
# A login shell in the guest: bash when the guest image has it.
SHELL = ["/bin/sh", "-c", "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l"]

Resolve = Callable[[str], str]
"""The sandbox id a user name stands for; raises (KvmSandboxError) when there is none."""
Run = Callable[[str, list[str], ProcessIO], int]
"""Runs a command in a sandbox's guest with the client's streams; its exit code."""


def load_host_key(path: Path) -> paramiko.ECDSAKey:
    """The server's key, made on first use (0600 beside the runtime's state)."""
    if path.exists():
        return paramiko.ECDSAKey(filename=str(path))
    key = paramiko.ECDSAKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, write in (
        (path.with_suffix(".pub"), lambda f: f.write(f"{key.get_name()} {key.get_base64()}\n")),
        (path, key.write_private_key),
    ):
        # Written beside and renamed: a crash leaves the old state or the new, never half a key.
        partial = target.with_name(f".{target.name}.partial")
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
    return key


class _Session(paramiko.ServerInterface):
    """What one client asked for: who it is, its terminal, its command."""

    def __init__(self, keys_file: Path, audit: AuditLog, peer: str) -> None:
        self.keys_file, self.audit, self.peer = keys_file, audit, peer
        self.user = self.who = ""
        self.pty: tuple[int, int] | None = None
        self.sizes: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize=64)
        self.command: list[str] | None = None
        self.requested = threading.Event()
        self.attempts = 0

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self.attempts += 1
        if self.attempts > MAX_AUTH_ATTEMPTS:
            return AUTH_FAILED  # the serving thread drops the connection
        who = authorized(self.keys_file, key)
        fingerprint = key.fingerprint
        if who is None:
            self.audit.event("auth-refused", user=username[:100], key=fingerprint, peer=self.peer)
            return AUTH_FAILED
        self.user, self.who = username, who
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_pty_request(
        self,
        channel: paramiko.Channel,
        term: bytes,
        width: int,
        height: int,
        pixelwidth: int,
        pixelheight: int,
        modes: bytes,
    ) -> bool:
        self.pty = (max(1, min(width, 10_000)), max(1, min(height, 10_000)))
        return True

    def check_channel_window_change_request(
        self, channel: paramiko.Channel, width: int, height: int, pixelwidth: int, pixelheight: int
    ) -> bool:
        with contextlib.suppress(queue.Full):
            self.sizes.put_nowait((width, height))
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        self.command = list(SHELL)
        self.requested.set()
        return True

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.command = ["/bin/sh", "-c", command.decode(errors="replace")]
        self.requested.set()
        return True


class _ChannelIO:
    """A channel as the client's streams: a Sink for the output, a ByteSource for stdin, a
    SizeSource for the terminal."""

    def __init__(self, channel: paramiko.Channel, session: _Session) -> None:
        self.channel, self.session = channel, session
        self._sent = {"stdout": 0, "stderr": 0}
        # Writes wait for the client's window this long at most; then the session is over.
        channel.settimeout(SEND_TIMEOUT)

    def position(self, stream: str) -> tuple[int, int]:
        return self._sent[stream], self._sent[stream]

    def write(self, stream: str, data: bytes) -> None:
        """Waits while the client's window is full (the command waits with it); output is dropped
        only once the channel is closed."""
        self._sent[stream] += len(data)
        try:
            if stream == "stderr" and self.session.pty is None:
                self.channel.sendall_stderr(data)
            else:
                self.channel.sendall(data)
        except TimeoutError:
            log.info("console client took nothing for %.0f s: session closed", SEND_TIMEOUT)
            self.channel.close()
        except (OSError, EOFError):
            pass

    def end(self, stream: str) -> None:
        pass

    def read(self, timeout: float | None = None) -> bytes:
        poller = select.poll()
        poller.register(self.channel.fileno(), select.POLLIN)
        if not poller.poll(None if timeout is None else timeout * 1000):
            raise TimeoutError
        try:
            return self.channel.recv(32 * 1024)
        except OSError:
            return b""

    def stop_reading(self) -> None:
        pass

    def next_size(self, timeout: float) -> tuple[int, int] | None:
        try:
            return self.session.sizes.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None


class ConsoleServer:
    """Accepts SSH clients on the console's addresses; one thread per client, MAX_SESSIONS at once,
    one session (shell or command) per connection."""

    def __init__(self, config: Config, resolve: Resolve, run: Run) -> None:
        self._config, self._resolve, self._run = config, resolve, run
        self._key = load_host_key(config.state_dir / "console_host_key")
        self.audit = AuditLog(config.state_dir / "console-audit.log")
        self._listeners: list[socket.socket] = []
        self._stopping = threading.Event()

    def start(self) -> None:
        """Raises OSError: an address cannot be listened on."""
        self._listeners.append(_unix_listener(self._config.console_socket))
        extra = self._config.console.listen
        if extra.startswith("unix:"):
            self._listeners.append(_unix_listener(Path(extra[5:])))
        elif extra:
            host, _, port = extra.rpartition(":")
            self._listeners.append(socket.create_server((host.strip("[]"), int(port))))
        for listener in self._listeners:
            slots = threading.BoundedSemaphore(MAX_SESSIONS)
            threading.Thread(target=self._accept, args=(listener, slots), name="console-accept", daemon=True).start()
        log.info("debug console listening on %s", ", ".join(str(sock.getsockname()) for sock in self._listeners))

    def stop(self) -> None:
        self._stopping.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self._config.console_socket.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket, slots: threading.BoundedSemaphore) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.1)
                continue
            if not slots.acquire(blocking=False):
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, str(peer or "unix"), slots), daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str, slots: threading.BoundedSemaphore) -> None:
        transport = paramiko.Transport(sock)
        try:
            transport.add_server_key(self._key)
            session = _Session(self._config.console.authorized_keys, self.audit, peer)
            transport.auth_timeout = AUTH_TIMEOUT
            transport.start_server(server=session)
            channel = None
            deadline = time.monotonic() + AUTH_TIMEOUT
            while channel is None and time.monotonic() < deadline and transport.is_active():
                if session.attempts > MAX_AUTH_ATTEMPTS:
                    self.audit.event("auth-dropped", attempts=session.attempts, peer=peer)
                    return
                channel = transport.accept(0.2)
            if channel is None or not session.requested.wait(AUTH_TIMEOUT) or session.command is None:
                return
            self._session(transport, channel, session)
        except (paramiko.SSHException, OSError, EOFError) as e:
            log.info("console connection from %s ended: %s", peer, e)
        finally:
            transport.close()
            slots.release()

    def _session(self, transport: paramiko.Transport, channel: paramiko.Channel, session: _Session) -> None:
        assert session.command is not None
        try:
            sandbox_id = self._resolve(session.user)
        except Exception as e:
            self.audit.event("session-refused", who=session.who, user=session.user[:100], reason=str(e)[:300])
            channel.sendall_stderr(f"kvmsandbox console: {e}\r\n".encode())
            channel.send_exit_status(255)
            return
        started = time.time()
        self.audit.event("session-start", who=session.who, pod=sandbox_id, command=session.command[-1][:300])
        cancelled = threading.Event()
        io = _ChannelIO(channel, session)
        process = ProcessIO(io, cancelled, stdin=io, sizes=io, tty=session.pty is not None)
        if session.pty is not None:
            with contextlib.suppress(queue.Full):
                session.sizes.put_nowait(session.pty)

        def watch() -> None:
            while transport.is_active() and not channel.closed and not cancelled.wait(0.5):
                pass
            cancelled.set()

        threading.Thread(target=watch, daemon=True).start()
        code = 255
        try:
            code = self._run(sandbox_id, session.command, process)
        except Exception as e:
            channel.sendall_stderr(f"kvmsandbox console: {e}\r\n".encode())
        finally:
            cancelled.set()
            self.audit.event(
                "session-end", who=session.who, pod=sandbox_id, seconds=round(time.time() - started, 3), exit_code=code
            )
        with contextlib.suppress(OSError, EOFError):
            channel.send_exit_status(code if code >= 0 else 255)


def _unix_listener(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    return sock

"""`kvmsandbox console POD`: the operator's side of the debug console, over the runtime's
root-only console socket, with the server's key checked against the one it wrote."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import paramiko

from kvmsandbox.config import Config
from kvmsandbox.errors import FailedPrecondition

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")


def identity(path: str | None) -> paramiko.PKey:
    """The operator's private key: ``path``, else the first of ~/.ssh/id_{ed25519,ecdsa,rsa}.

    Raises:
        FailedPrecondition: none can be read.
    """
    candidates = [Path(path)] if path else [Path.home() / ".ssh" / name for name in DEFAULT_IDENTITIES]
    for candidate in candidates:
        if candidate.exists():
            try:
                return paramiko.PKey.from_path(str(candidate))
            except (paramiko.SSHException, OSError, ValueError) as e:
                raise FailedPrecondition(f"cannot read the key {candidate}: {e}") from None
    raise FailedPrecondition(f"no private key: pass --identity (looked for {', '.join(map(str, candidates))})")


def connect(config: Config, pod: str, key: paramiko.PKey) -> paramiko.Transport:
    """An authenticated session with the runtime's console for ``pod``.

    Raises:
        FailedPrecondition: the runtime does not run, its key is not the one it wrote, or the key
        is refused.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(config.console_socket))
    except OSError as e:
        sock.close()
        raise FailedPrecondition(
            f"no debug console at {config.console_socket} ({e}): is `kvmsandbox serve` running?"
        ) from None
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=30)
    expected = (config.state_dir / "console_host_key.pub").read_text().split()
    server_key = transport.get_remote_server_key()
    if [server_key.get_name(), server_key.get_base64()] != expected[:2]:
        transport.close()
        raise FailedPrecondition("the console's key is not the one this runtime wrote: refusing to go on")
    try:
        transport.auth_publickey(pod, key)
    except paramiko.AuthenticationException:
        transport.close()
        raise FailedPrecondition(
            f"the console refused the key {key.fingerprint}: add its public key to {config.console.authorized_keys}"
        ) from None
    return transport


def run(config: Config, pod: str, key_path: str | None, command: list[str]) -> int:
    """Opens a shell (or runs ``command``) in the pod's guest; returns its exit status."""
    transport = connect(config, pod, identity(key_path))
    channel = transport.open_session()
    interactive = sys.stdin.isatty() and not command
    if interactive:
        size = shutil.get_terminal_size()
        channel.get_pty(os.environ.get("TERM", "xterm"), size.columns, size.lines)
        signal.signal(signal.SIGWINCH, lambda *_: channel.resize_pty(*shutil.get_terminal_size()))
        channel.invoke_shell()
    else:
        channel.exec_command(" ".join(command) if command else "exec /bin/sh")
    with _raw(interactive):
        _pump(channel, interactive)
    code = channel.recv_exit_status()
    transport.close()
    return code


def _pump(channel: paramiko.Channel, interactive: bool) -> None:
    stdin_open = True
    while not (channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready()):
        readable, _, _ = select.select([channel, *([sys.stdin] if stdin_open else [])], [], [], 0.5)
        if channel in readable:
            while channel.recv_ready():
                os.write(1, channel.recv(65536))
            while channel.recv_stderr_ready():
                os.write(2, channel.recv_stderr(65536))
            if channel.closed and not channel.recv_ready():
                return
        if sys.stdin in readable:
            data = os.read(0, 65536)
            if data:
                channel.sendall(data)
            else:
                stdin_open = False
                if not interactive:
                    channel.shutdown_write()


@contextlib.contextmanager
def _raw(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(0)
    try:
        tty.setraw(0)
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)

"""The debug console against ``kvmsandbox serve`` and a real guest: a paramiko client with an
authorized key gets a shell in the guest (not in a container: the guest kernel, the agent's
processes), with a terminal and an exit status; a wrong key is refused; the audit log has both."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from kvmsandbox.config import load_config
from kvmsandbox.console.client import connect
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from tests.cri.conftest import CriServer
from tests.cri.test_cri_lifecycle import pod_config

pytestmark = pytest.mark.vm


@pytest.fixture
def pod(cri_server: CriServer, tmp_path: Path) -> Iterator[str]:
    rt = cri_server.runtime
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=pod_config("debugged", tmp_path)), timeout=300)
    yield pod_id.pod_sandbox_id
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id.pod_sandbox_id), timeout=300)


def run(transport: paramiko.Transport, command: str) -> tuple[int, bytes, bytes]:
    channel = transport.open_session()
    channel.exec_command(command)
    out = channel.makefile("rb").read()
    err = channel.makefile_stderr("rb").read()
    return channel.recv_exit_status(), out, err


def test_an_authorized_key_gets_a_shell_in_the_guest_and_the_session_is_audited(
    cri_server: CriServer, pod: str
) -> None:
    config = load_config(cri_server.config_path)
    key = paramiko.ECDSAKey(filename=str(cri_server.config_path.parent / "console_key"))
    transport = connect(config, pod[:16], key)  # a unique prefix names the pod
    try:
        code, out, err = run(transport, "uname -r; cat /proc/1/comm; echo to-err >&2; exit 3")
        assert code == 3 and err == b"to-err\n"
        release, init = out.decode().split()
        # The guest's kernel (Debian's, not this host's) and the guest's own PID 1 (the agent).
        assert release.endswith("-amd64") and release != os.uname().release and init.startswith("python")
    finally:
        transport.close()
    # A terminal: a login shell typed into (one session per connection).
    transport = connect(config, pod, key)
    try:
        channel = transport.open_session()
        channel.get_pty("xterm", 90, 30)
        channel.invoke_shell()
        channel.sendall(b"stty size; echo TYPED-$((6*7)); exit 5\n")
        seen = b""
        deadline = time.monotonic() + 60
        while not channel.exit_status_ready() and time.monotonic() < deadline:
            if channel.recv_ready():
                seen += channel.recv(65536)
            time.sleep(0.05)
        seen += channel.recv(65536) if channel.recv_ready() else b""
        assert channel.recv_exit_status() == 5 and b"TYPED-42" in seen and b"30 90" in seen, seen
    finally:
        transport.close()
    events = [json.loads(line) for line in (config.state_dir / "console-audit.log").read_text().splitlines()]
    ends = [e for e in events if e["event"] == "session-end" and e["pod"] == pod]
    assert [e["exit_code"] for e in ends][-2:] == [3, 5]
    assert all("operator@test" in e["who"] and e["seconds"] >= 0 for e in ends)


def test_a_wrong_key_or_an_unknown_pod_is_refused(cri_server: CriServer, pod: str) -> None:
    config = load_config(cri_server.config_path)
    stranger = paramiko.ECDSAKey.generate()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(config.console_socket))
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=30)
    with pytest.raises(paramiko.AuthenticationException):
        transport.auth_publickey(pod, stranger)
    transport.close()
    key = paramiko.ECDSAKey(filename=str(cri_server.config_path.parent / "console_key"))
    transport = connect(config, "no-such-pod", key)
    try:
        code, _, err = run(transport, "true")
        assert code == 255 and b"no-such-pod not found" in err
    finally:
        transport.close()
    events = [json.loads(line) for line in (config.state_dir / "console-audit.log").read_text().splitlines()]
    assert any(e["event"] == "auth-refused" and e["key"] == stranger.fingerprint for e in events)
    assert any(e["event"] == "session-refused" and e["user"] == "no-such-pod" for e in events)


def test_kvmsandbox_console_runs_a_command_in_the_guest(cri_server: CriServer, pod: str) -> None:
    import subprocess
    import sys

    key = cri_server.config_path.parent / "console_key"
    cli = [sys.executable, "-m", "kvmsandbox.cli", "--config", str(cri_server.config_path)]
    done = subprocess.run(
        [*cli, "console", "--identity", str(key), pod, "cat", "/proc/sys/kernel/hostname;", "exit", "2"],
        input=b"",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == b"debugged\n", done.stderr

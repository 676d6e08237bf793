"""Exec through the streaming server against ``kvmsandbox serve`` and a real guest: crictl (v1.36,
SPDY/3.1, as kubelet) gets the output streams apart and the exit code; a client that goes away
mid-command leaves no process in the guest; requests the runtime cannot serve get a clear status."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import paramiko
import pytest

from kvmsandbox.config import load_config
from kvmsandbox.console.client import connect
from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.cri.streaming import spdy
from tests.cri.conftest import CriServer
from tests.cri.test_cri_lifecycle import container_config, pod_config
from tests.waiting import wait_until

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]


def find_crictl() -> str | None:
    candidates = [
        os.environ.get("KVMSANDBOX_CRICTL", ""),
        shutil.which("crictl") or "",
        str(REPO.parent / "shared" / "tools" / "cri-tools" / "crictl"),
        "/work/shared/tools/cri-tools/crictl",
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture
def running(cri_server: CriServer, busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running container (its id) in a pod of its own (each test's pods are removed after it)."""
    rt = cri_server.runtime
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    config = pod_config("streaming", tmp_path_factory.mktemp("streaming-logs"))
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=300).pod_sandbox_id
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(
            pod_sandbox_id=pod, config=container_config("app", busybox_image, "sleep 3600"), sandbox_config=config
        ),
        timeout=120,
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
    yield cid
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)


def crictl(cri_server: CriServer, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    binary = find_crictl()
    if binary is None:
        pytest.skip("crictl v1.36 is not on this machine (set KVMSANDBOX_CRICTL)")
    endpoint = f"unix://{cri_server.socket}"
    command = [binary, "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "--timeout", "60s", *args]
    return subprocess.run(command, capture_output=True, timeout=timeout, check=False)


def test_crictl_exec_streams_stdout_and_stderr_apart_and_gives_the_exit_code(
    cri_server: CriServer, running: str
) -> None:
    done = crictl(cri_server, "exec", running, "sh", "-c", "echo out; echo err >&2; exit 3")
    # crictl reports a non-zero exit code in words and exits 1.
    assert done.returncode == 1 and b"command terminated with exit code 3" in done.stderr, done.stderr
    assert done.stdout == b"out\n"
    assert b"err\n" in done.stderr
    ok = crictl(cri_server, "exec", running, "sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"a" * 3_000_000
    # The short id `crictl ps` shows works too (a unique prefix, as containerd accepts), streaming or not.
    short = running[:13]
    assert crictl(cri_server, "exec", short, "echo", "short").stdout == b"short\n"
    synced = crictl(cri_server, "exec", "-s", short, "echo", "sync")  # crictl adds blank lines of its own
    assert synced.returncode == 0 and synced.stdout.startswith(b"sync\n"), synced.stderr


class Terminal:
    """crictl on a pseudo-terminal of its own, as a person at a shell runs it."""

    def __init__(self, command: list[str]) -> None:
        self.master, slave = os.openpty()
        self.resize(24, 80)
        self.proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: bytes, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while pattern not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.master], [], [], remaining)[0]:
                raise AssertionError(f"{pattern!r} did not appear; the terminal shows {self.seen[-2000:]!r}")
            try:
                self.seen += os.read(self.master, 65536)
            except OSError:  # EIO: crictl has exited
                raise AssertionError(f"{pattern!r} never came before crictl exited: {self.seen[-2000:]!r}") from None
        return self.seen

    def close(self) -> int:
        """Waits for crictl to exit, takes what it wrote last, and returns its exit code."""
        code = self.proc.wait(60)
        with contextlib.suppress(OSError):  # EIO once everything was read
            while select.select([self.master], [], [], 1)[0] and (data := os.read(self.master, 65536)):
                self.seen += data
        os.close(self.master)
        return code


def crictl_command(cri_server: CriServer, *args: str) -> list[str]:
    binary = find_crictl()
    if binary is None:
        pytest.skip("crictl v1.36 is not on this machine (set KVMSANDBOX_CRICTL)")
    endpoint = f"unix://{cri_server.socket}"
    return [binary, "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, "--timeout", "60s", *args]


def test_crictl_exec_it_gives_a_shell_with_a_terminal_that_follows_resizes(cri_server: CriServer, running: str) -> None:
    term = Terminal(crictl_command(cri_server, "exec", "-it", running, "sh"))
    try:
        term.type("tty; stty size; echo READY-$((6*7))\n")
        seen = term.expect(b"READY-42")
        assert b"/dev/pts/" in seen and b"24 80" in seen, seen
        term.resize(40, 132)
        os.kill(term.proc.pid, signal.SIGWINCH)
        deadline = time.monotonic() + 30
        while b"40 132" not in term.seen:  # the resize races the next command: ask until it shows
            assert time.monotonic() < deadline, term.seen[-2000:]
            term.type("stty size\n")
            time.sleep(0.5)
            with contextlib.suppress(AssertionError):
                term.expect(b"40 132", timeout=2)
        term.type("exit 7\n")
    finally:
        code = term.close()
    assert code == 1 and b"exit code 7" in term.seen, term.seen[-2000:]


def test_crictl_exec_i_passes_stdin_through_to_its_end(cri_server: CriServer, running: str) -> None:
    data = os.urandom(1_500_000)
    done = subprocess.run(
        crictl_command(cri_server, "exec", "-i", running, "sh", "-c", "cat >/tmp/in; md5sum </tmp/in; wc -c </tmp/in"),
        input=data,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [hashlib.md5(data).hexdigest().encode(), b"-", str(len(data)).encode()]


def upgraded(url: str) -> tuple[socket.socket, bytes]:
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname and parts.port
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(
        f"POST {parts.path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


def test_a_client_that_goes_away_mid_command_leaves_no_process_in_the_guest(
    cri_server: CriServer, running: str
) -> None:
    rt = cri_server.runtime
    url = rt.Exec(cri.ExecRequest(container_id=running, cmd=["sleep", "4321"], stdout=True, stderr=True)).url
    sock, _ = upgraded(url)
    encoder = spdy.Encoder()
    for i, kind in enumerate(("error", "stdout", "stderr")):
        sock.sendall(encoder.encode(spdy.SynStream(2 * i + 1, {"streamtype": [kind]})))
    received: list[bytes] = []

    def drain() -> None:  # as a client does: it reads what the server sends
        try:
            while chunk := sock.recv(65536):
                received.append(chunk)
        except OSError as e:
            received.append(repr(e).encode())

    threading.Thread(target=drain, daemon=True).start()

    def sleeping() -> bool:
        ps = rt.ExecSync(cri.ExecSyncRequest(container_id=running, cmd=["ps"], timeout=30))
        return b"sleep 4321" in ps.stdout

    wait_until(sleeping, 60, "the streamed command to run")
    sock.close()
    wait_until(lambda: not sleeping(), 60, "the command to be killed once its client left")
    # The token was used: the URL works once.
    again = socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), timeout=30)
    again.sendall(f"POST {urlsplit(url).path} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n".encode())
    assert again.recv(4096).startswith(b"HTTP/1.1 404")
    again.close()


def test_the_outcome_is_a_v4_status_on_the_error_stream(cri_server: CriServer, running: str) -> None:
    url = cri_server.runtime.Exec(cri.ExecRequest(container_id=running, cmd=["false"], stderr=True)).url
    sock, rest = upgraded(url)
    encoder, decoder = spdy.Encoder(), spdy.Decoder()
    sock.sendall(
        encoder.encode(spdy.SynStream(1, {"streamtype": ["error"]}))
        + encoder.encode(spdy.SynStream(3, {"streamtype": ["stderr"]}))
    )
    error = b""
    frames = decoder.feed(rest)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for f in frames:
            if isinstance(f, spdy.DataFrame) and f.stream_id == 1:
                error += f.data
                if f.fin:
                    sock.close()
                    status = json.loads(error)
                    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
                    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "1"}]
                    return
        frames = decoder.feed(sock.recv(65536))
    raise AssertionError("no outcome on the error stream")


BAD_REQUESTS = [
    ({"tty": True, "stdout": True, "stderr": True}, grpc.StatusCode.INVALID_ARGUMENT, "stderr must be false"),
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "one of stdin, stdout or stderr"),
    ({"stdout": True, "cmd": []}, grpc.StatusCode.INVALID_ARGUMENT, "needs a command"),
    ({"stdout": True, "container_id": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
]


def test_exec_requests_it_cannot_serve_get_a_clear_status(cri_server: CriServer, running: str) -> None:
    for changes, code, words in BAD_REQUESTS:
        fields: dict[str, object] = {"container_id": running, "cmd": ["true"], **changes}
        with pytest.raises(grpc.RpcError) as e:
            cri_server.runtime.Exec(cri.ExecRequest(**fields))  # type: ignore[arg-type]
        assert e.value.code() == code and words in (e.value.details() or ""), changes


def server_threads_and_fds(cri_server: CriServer) -> tuple[int, int]:
    assert cri_server.process is not None
    pid = cri_server.process.pid
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def test_sessions_cut_off_mid_stream_leave_no_thread_fd_or_process(cri_server: CriServer, running: str) -> None:
    rt = cri_server.runtime
    rt.ExecSync(cri.ExecSyncRequest(container_id=running, cmd=["sh", "-c", "nc -ll -p 8081 -e cat &"], timeout=30))
    pod = next(c.pod_sandbox_id for c in rt.ListContainers(cri.ListContainersRequest()).containers if c.id == running)

    def sleeping() -> bool:
        ps = rt.ExecSync(cri.ExecSyncRequest(container_id=running, cmd=["ps"], timeout=30)).stdout
        return b"sleep 4321" in ps

    def cut_off_sessions() -> None:
        """An exec with stdin and a port-forward with data in flight, each client gone at once."""
        url = rt.Exec(cri.ExecRequest(container_id=running, cmd=["sleep", "4321"], stdin=True, stdout=True)).url
        sock, _ = upgraded(url)
        encoder = spdy.Encoder()
        for i, kind in enumerate(("error", "stdin", "stdout")):
            sock.sendall(encoder.encode(spdy.SynStream(2 * i + 1, {"streamtype": [kind]})))
        sock.sendall(encoder.encode(spdy.DataFrame(3, b"typed but never read\n")))
        wait_until(sleeping, 60, "the streamed command to run")
        sock.close()
        pf = rt.PortForward(cri.PortForwardRequest(pod_sandbox_id=pod, port=[8081])).url
        parts = urlsplit(pf)
        assert parts.hostname and parts.port
        sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        sock.sendall(
            f"POST {parts.path} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            "X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
        encoder = spdy.Encoder()  # header compression is per connection
        headers = {"port": ["8081"], "requestid": ["0"]}
        sock.sendall(encoder.encode(spdy.SynStream(1, {"streamtype": ["error"], **headers})))
        sock.sendall(encoder.encode(spdy.SynStream(3, {"streamtype": ["data"], **headers})))
        sock.sendall(encoder.encode(spdy.DataFrame(3, b"x" * 100_000)))
        echoed = b""
        while b"x" * 1000 not in echoed:  # the echo began: the forward is under way
            echoed += sock.recv(65536)
        sock.close()
        wait_until(lambda: not sleeping(), 60, "the command to be killed once its client left")

    def agent_threads_and_fds() -> tuple[int, int]:
        """Counted in the guest, through the debug console (outside the containers)."""
        config = load_config(cri_server.config_path)
        key = paramiko.ECDSAKey(filename=str(cri_server.config_path.parent / "console_key"))
        transport = connect(config, pod, key)
        try:
            channel = transport.open_session()
            channel.exec_command("ls /proc/1/task | wc -l; ls /proc/1/fd | wc -l")
            out = channel.makefile("rb").read().split()
        finally:
            transport.close()
        return int(out[0]), int(out[1])

    cut_off_sessions()  # the first round may start pool threads that stay
    time.sleep(3)
    threads, fds = server_threads_and_fds(cri_server)
    agent_threads, agent_fds = agent_threads_and_fds()
    for _ in range(3):
        cut_off_sessions()

    def back_to_baseline() -> bool:
        now, agent = server_threads_and_fds(cri_server), agent_threads_and_fds()
        return (
            now[0] <= threads + 2 and now[1] <= fds + 2 and agent[0] <= agent_threads + 2 and agent[1] <= agent_fds + 2
        )

    wait_until(
        back_to_baseline,
        60,
        f"server and agent back to their threads and fds ({threads}, {fds}, {agent_threads}, {agent_fds})",
    )


def test_exec_runs_as_the_container_with_its_environment_and_directory(
    cri_server: CriServer, busybox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rt = cri_server.runtime
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    config = pod_config("exec-as", tmp_path_factory.mktemp("exec-as-logs"))
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=300).pod_sandbox_id
    try:
        container = container_config("app", busybox_image, "sleep 3600")
        container.linux.security_context.run_as_user.value = 1000
        container.linux.security_context.run_as_group.value = 3000
        container.linux.security_context.supplemental_groups.append(4000)
        container.working_dir = "/tmp"
        cid = rt.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config), timeout=120
        ).container_id
        rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
        script = ["sh", "-c", "id -u; id -g; id -G; echo $GREETING; pwd"]
        expected = b"1000\n3000\n3000 4000\nhello\n/tmp\n"
        synced = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=script, timeout=30))
        assert synced.stdout == expected, synced
        streamed = crictl(cri_server, "exec", cid, *script)
        assert streamed.returncode == 0 and streamed.stdout == expected, streamed
    finally:
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)


def test_security_context_capabilities_no_new_privs_and_proc_paths_reach_the_container_and_its_execs(
    cri_server: CriServer, busybox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rt = cri_server.runtime
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=busybox_image)))
    config = pod_config("secctx", tmp_path_factory.mktemp("secctx-logs"))
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=300).pod_sandbox_id
    try:

        def create(**changes: object) -> str:
            container = container_config("app", busybox_image, "sleep 3600")
            sc = container.linux.security_context
            for key, value in changes.items():
                if key == "add":
                    sc.capabilities.add_capabilities.extend(value)  # type: ignore[arg-type]
                elif key == "drop":
                    sc.capabilities.drop_capabilities.extend(value)  # type: ignore[arg-type]
                elif key in ("masked_paths", "readonly_paths"):
                    getattr(sc, key).extend(value)
                elif key == "run_as_group":
                    sc.run_as_group.value = value  # type: ignore[assignment]
                else:
                    setattr(sc, key, value)
            request = cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config)
            return rt.CreateContainer(request, timeout=120).container_id

        cid = create(
            drop=["ALL"], add=["NET_ADMIN"], no_new_privs=True, masked_paths=["/etc/hostname"], readonly_paths=["/tmp"]
        )
        rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
        script = "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; "
        script += "cat /etc/hostname | wc -c; touch /tmp/x || echo ro"
        out = rt.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=30)).stdout.decode()
        fields = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
        assert fields == {"CapEff": "0000000000001000", "CapBnd": "0000000000001000", "NoNewPrivs": "1"}, out
        assert out.splitlines()[-2:] == ["0", "ro"], out  # masked: empty; read-only: refused
        for changes, words in (
            ({"run_as_group": 10}, "run_as_group needs run_as_user"),
            ({"add": ["NOT_A_CAP"]}, "unknown capability"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                create(**changes)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in (e.value.details() or "")
    finally:
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)


def test_crictl_exec_over_websocket_streams_apart_gives_the_exit_code_and_ends_stdin(
    cri_server: CriServer, running: str
) -> None:
    """crictl's own WebSocket client (v5.channel.k8s.io, as kubectl's): the same as over SPDY."""
    done = crictl(cri_server, "exec", "--transport", "websocket", running, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert done.returncode == 1 and b"command terminated with exit code 3" in done.stderr, done.stderr
    assert done.stdout == b"out\n" and b"err\n" in done.stderr
    data = os.urandom(300_000)
    piped = subprocess.run(
        crictl_command(cri_server, "exec", "-i", "--transport", "websocket", running, "sh", "-c", "md5sum"),
        input=data,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert piped.returncode == 0 and piped.stdout.split()[0] == hashlib.md5(data).hexdigest().encode(), piped

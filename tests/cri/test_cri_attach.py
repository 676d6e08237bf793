"""Attach through the streaming server against ``kvmsandbox serve`` and a real guest: crictl
attaches to a container started with a terminal and stdin (a shell typed into, resized, and its
log in terminal mode: one stream), and to one with a plain stdin closed after the first attach."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from kvmsandbox.cri.runtime.v1 import api_pb2 as cri
from kvmsandbox.sandbox.logs import parse_cri_log
from tests.cri.conftest import CriServer
from tests.cri.test_cri_lifecycle import container_config, pod_config
from tests.cri.test_cri_streaming import Terminal, crictl_command
from tests.waiting import wait_until

pytestmark = pytest.mark.vm


def start(cri_server: CriServer, image: str, logs: Path, script: str, **stdio: bool) -> tuple[str, str, Path]:
    """A pod with one running container made with ``stdio`` (tty, stdin, stdin_once); its ids and log."""
    rt = cri_server.runtime
    cri_server.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)))
    config = pod_config("attached", logs)
    pod = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=300).pod_sandbox_id
    container = container_config("app", image, script)
    for key, value in stdio.items():
        setattr(container, key, value)
    cid = rt.CreateContainer(
        cri.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config), timeout=120
    ).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=120)
    return pod, cid, logs / "app" / "0.log"


def state_of(cri_server: CriServer, cid: str) -> int:
    return cri_server.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status.state


def test_crictl_attach_it_to_a_shell_with_a_terminal(cri_server: CriServer, busybox_image: str, tmp_path: Path) -> None:
    pod, cid, log = start(cri_server, busybox_image, tmp_path, "exec sh", tty=True, stdin=True)
    try:
        term = Terminal(crictl_command(cri_server, "attach", "-it", cid))
        try:
            time.sleep(1)  # crictl attaches; what the shell printed before is in the log, not here
            term.type("tty; echo ATTACHED-$((6*7))\n")
            seen = term.expect(b"ATTACHED-42")
            assert b"/dev/pts/" in seen
            term.resize(33, 111)
            os.kill(term.proc.pid, signal.SIGWINCH)
            deadline = time.monotonic() + 30
            while b"33 111" not in term.seen:
                assert time.monotonic() < deadline, term.seen[-2000:]
                term.type("stty size\n")
                with contextlib.suppress(AssertionError):
                    term.expect(b"33 111", timeout=2)
            term.type("exit 0\n")
        finally:
            code = term.close()
        assert code == 0, term.seen[-2000:]
        wait_until(lambda: state_of(cri_server, cid) == cri.CONTAINER_EXITED, 60, "the shell to exit")
        # A terminal's output is one stream: the log has only stdout, with the terminal's line ends.
        entries = parse_cri_log(log.read_bytes().decode())
        assert {stream for stream, _, _ in entries} == {"stdout"}, entries
        assert any("ATTACHED-42" in line for _, _, line in entries)
    finally:
        cri_server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)


def test_crictl_attach_i_to_a_stdin_closed_after_the_first_attach(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    script = "while read line; do echo got:$line; done; echo stdin-ended >&2"
    pod, cid, log = start(cri_server, busybox_image, tmp_path, script, stdin=True, stdin_once=True)
    try:
        done = subprocess.run(
            crictl_command(cri_server, "attach", "-i", cid),
            input=b"one\ntwo\n",
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"got:one\ngot:two\n" and b"stdin-ended" in done.stderr, done
        wait_until(lambda: state_of(cri_server, cid) == cri.CONTAINER_EXITED, 60, "the container to see its EOF")
        entries = parse_cri_log(log.read_bytes().decode())
        assert [(s, line) for s, _, line in entries if s == "stdout"] == [("stdout", "got:one"), ("stdout", "got:two")]
    finally:
        cri_server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)


def test_attach_requests_it_cannot_serve_get_a_clear_status(
    cri_server: CriServer, busybox_image: str, tmp_path: Path
) -> None:
    pod, cid, _ = start(cri_server, busybox_image, tmp_path, "sleep 3600")
    rt = cri_server.runtime
    try:
        for fields, code, words in (
            ({"tty": True, "stdout": True}, grpc.StatusCode.INVALID_ARGUMENT, "has no terminal"),
            ({}, grpc.StatusCode.INVALID_ARGUMENT, "one of stdin, stdout or stderr"),
            ({"stdout": True, "container_id": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
        ):
            with pytest.raises(grpc.RpcError) as e:
                rt.Attach(cri.AttachRequest(**{"container_id": cid, **fields}))  # type: ignore[arg-type]
            assert e.value.code() == code and words in (e.value.details() or ""), fields
        assert "/attach/" in rt.Attach(cri.AttachRequest(container_id=cid, stdout=True, stderr=True)).url
    finally:
        rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)


def test_removing_the_pod_ends_an_exec_session(cri_server: CriServer, busybox_image: str, tmp_path: Path) -> None:
    pod, cid, _ = start(cri_server, busybox_image, tmp_path, "sleep 3600")
    session = subprocess.Popen(
        crictl_command(cri_server, "exec", "-i", cid, "sleep", "1000"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def sleeping() -> bool:
            ps = cri_server.runtime.ExecSync(cri.ExecSyncRequest(container_id=cid, cmd=["ps"], timeout=30)).stdout
            return b"sleep 1000" in ps

        wait_until(sleeping, 60, "the exec to run")
        started = time.monotonic()
        cri_server.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)
        _, err = session.communicate(timeout=120)
        assert session.returncode != 0 and time.monotonic() - started < 120, err
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()

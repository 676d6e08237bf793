"""The agent's test mode (``kvmsandbox.misbehave=``) against the host's real client, on a socket
pair: it is armed by the kernel command line only, behaves until the trigger, and each scenario
does to the host what the hostile-guest VM tests expect of it."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.agent import wire
from kvmsandbox.agent.client import AgentClient
from kvmsandbox.agent.guest import misbehave, server
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import AgentMisbehaved, DeadlineExceeded
from tests.waiting import wait_until


def ok(request: pb.Request) -> pb.Response:
    """An agent with one running container that answers everything."""
    body = b""
    if request.method == "ListContainers":
        body = pb.ListContainersResponse(containers=[pb.ContainerInfo(id="c", state=pb.RUNNING)]).SerializeToString()
    elif request.method == "ContainerStats":
        body = pb.ContainerStatsResponse(cpu_usage_ns=7).SerializeToString()
    return pb.Response(id=request.id, status=pb.Status(code=pb.OK), body=body)


class Guest:
    """Serves the host's requests through the agent's own dispatch, one thread per request."""

    def __init__(self) -> None:
        self.host, self.guest = socket.socketpair()
        self.violations: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _send(self, data: bytes) -> None:
        with self._lock, contextlib.suppress(OSError):  # the host hung up
            self.guest.sendall(data)

    def _serve(self) -> None:
        decoder = wire.FrameDecoder()
        try:
            while data := self.guest.recv(65536):
                for frame in decoder.feed(data):
                    threading.Thread(target=server._dispatch, args=(ok, frame.request, self._send), daemon=True).start()
        except OSError:
            return

    def client(self) -> AgentClient:
        sock = self.host
        self.host = None  # type: ignore[assignment]

        def connect(timeout: float) -> socket.socket:
            if sock is None:
                raise ConnectionRefusedError("one connection only")
            return sock

        return AgentClient(connect, "sandbox-test", default_timeout=5, on_violation=self.violations.append)


@pytest.fixture
def armed() -> Iterator[Guest]:
    guest = Guest()
    yield guest
    guest.guest.close()


def arm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cmdline: str) -> None:
    monkeypatch.setattr(misbehave, "armed", None)
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    misbehave.arm(tmp_path / "cmdline")


def test_only_the_kernel_command_line_arms_a_known_scenario(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    arm(monkeypatch, tmp_path, "console=ttyS0 kvmsandbox.root=/dev/vda")
    assert misbehave.armed is None
    arm(monkeypatch, tmp_path, "kvmsandbox.misbehave=no-such-thing")
    assert misbehave.armed is None
    arm(monkeypatch, tmp_path, "console=ttyS0 kvmsandbox.misbehave=silence quiet")
    assert misbehave.armed is not None and misbehave.armed.scenario == "silence"
    monkeypatch.setattr(misbehave, "armed", None)
    misbehave.arm(tmp_path / "missing")
    assert misbehave.armed is None


BREAKING = ("bad-magic", "huge-garbage", "undecodable", "unknown-ids")


@pytest.mark.parametrize("scenario", BREAKING)
def test_a_breaking_scenario_behaves_until_the_trigger(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, armed: Guest, scenario: str
) -> None:
    arm(monkeypatch, tmp_path, f"kvmsandbox.misbehave={scenario}")
    client = armed.client()
    assert [c.id for c in client.list_containers()] == ["c"]
    assert client.container_stats("c").cpu_usage_ns == 7
    with pytest.raises(AgentMisbehaved):
        client.update_container("c", {})
    # Pending calls fail first, then the violation is reported.
    wait_until(lambda: armed.violations, 5, "the violation to be reported")
    assert len(armed.violations) == 1 and client.violation is not None


def test_unknown_enum_lists_unknown_states_then_answers_an_unknown_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, armed: Guest
) -> None:
    arm(monkeypatch, tmp_path, "kvmsandbox.misbehave=unknown-enum")
    client = armed.client()
    assert client.container_stats("c").cpu_usage_ns == 7
    client.update_container("c", {})
    assert [c.state for c in client.list_containers()] == [misbehave.UNKNOWN_STATE]
    with pytest.raises(AgentMisbehaved):
        client.container_stats("c")


def test_stats_max_endless_output_and_silence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, armed: Guest) -> None:
    arm(monkeypatch, tmp_path, "kvmsandbox.misbehave=stats-max")
    client = armed.client()
    assert client.container_stats("c").cpu_usage_ns == 7
    client.update_container("c", {})
    assert client.container_stats("c") == misbehave.largest_stats()
    monkeypatch.setattr(misbehave, "armed", misbehave.Misbehaviour("endless-output"))
    client.update_container("c", {})
    answer = client.call("ReadStdio", pb.ReadStdioRequest(container_id="c", wait_ms=5000), pb.ReadStdioResponse)
    assert len(answer.data) == misbehave.ENDLESS_CHUNK_BYTES and not answer.eof
    monkeypatch.setattr(misbehave, "armed", misbehave.Misbehaviour("silence"))
    assert client.list_containers()
    with pytest.raises(DeadlineExceeded):
        client.call("UpdateContainer", pb.UpdateContainerRequest(), pb.UpdateContainerResponse, timeout=0.5)
    with pytest.raises(DeadlineExceeded):
        client.list_containers(timeout=0.5)
    assert client.violation is None


def test_a_flood_within_what_the_host_drops_keeps_the_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, armed: Guest
) -> None:
    arm(monkeypatch, tmp_path, "kvmsandbox.misbehave=flood")
    monkeypatch.setattr(misbehave, "FLOOD_SECONDS", 0.5)
    monkeypatch.setattr(misbehave, "FLOOD_BODY_BYTES", 1024)
    client = armed.client()
    client.update_container("c", {})
    assert client.list_containers() and client.violation is None

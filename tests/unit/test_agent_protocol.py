"""The host client against the real agent service over a socket pair: the protocol end to end,
without a VM (container calls need crun in a guest and are covered by the VM tests)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from kvmsandbox.agent.client import AgentClient
from kvmsandbox.agent.guest.reaper import Reaper
from kvmsandbox.agent.guest.rpc import AgentService
from kvmsandbox.agent.guest.runner import ContainerRunner
from kvmsandbox.agent.guest.server import VsockServer
from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.errors import AgentError, DeadlineExceeded, Unavailable


@pytest.fixture
def client(tmp_path) -> Iterator[AgentClient]:  # type: ignore[no-untyped-def]
    host, guest = socket.socketpair()
    runner = ContainerRunner(Reaper(), bundles=tmp_path / "bundles", crun="/nonexistent/crun")
    server = VsockServer(0, AgentService(runner, "test").handle)
    threading.Thread(target=server._serve_connection, args=(guest,), daemon=True).start()
    used = []

    def connect(timeout: float) -> socket.socket:
        if used:
            raise ConnectionRefusedError("only one connection in this test")
        used.append(1)
        return host

    c = AgentClient(connect, "test-sandbox", default_timeout=5)
    yield c
    c.close()


def test_health_and_guest_details_round_trip(client: AgentClient) -> None:
    assert client.wait_ready(5).agent_version
    details = client.guest_details()
    assert details.mem_total_bytes > details.mem_available_bytes > 0
    assert details.agent_rss_bytes > 0
    assert details.transport == "test"


def test_errors_keep_the_agents_code_and_words(client: AgentClient) -> None:
    with pytest.raises(AgentError) as e:
        client.start_container("nope")
    assert e.value.grpc_code == "NOT_FOUND"
    assert "container nope not found" in str(e.value)


def test_invalid_oci_spec_is_invalid_argument(client: AgentClient, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AgentError) as e:
        client.create_container("c1", {"ociVersion": "1.0.2", "process": {"args": []}, "root": {"path": "/"}})
    assert e.value.grpc_code == "INVALID_ARGUMENT"
    assert "process.args must be a non-empty list" in str(e.value)
    with pytest.raises(AgentError) as e:
        client.create_container("bad/id", {})
    assert e.value.grpc_code == "INVALID_ARGUMENT"


def test_unknown_method_is_unimplemented(client: AgentClient) -> None:
    with pytest.raises(AgentError) as e:
        client.call("Teleport", pb.HealthRequest(), pb.HealthResponse)
    assert e.value.grpc_code == "UNIMPLEMENTED"


def test_many_calls_in_flight_on_one_connection(client: AgentClient) -> None:
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.guest_details().kernel_release)) for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20


def test_a_silent_peer_gives_a_deadline_naming_the_sandbox() -> None:
    host, guest = socket.socketpair()
    c = AgentClient(lambda timeout: host, "sandbox-xyz")
    with pytest.raises(DeadlineExceeded, match="sandbox-xyz did not answer Health"):
        c.call("Health", pb.HealthRequest(), pb.HealthResponse, timeout=0.3)
    guest.close()
    c.close()


def test_wait_ready_gives_up_when_the_vm_is_gone() -> None:
    def refuse(timeout: float) -> socket.socket:
        raise ConnectionRefusedError("no socket")

    with pytest.raises(Unavailable, match="stopped before its agent answered"):
        AgentClient(refuse, "sandbox-abc").wait_ready(5, alive=lambda: False)


def test_a_crun_error_quotes_only_what_its_own_command_logged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runner = ContainerRunner(Reaper(), bundles=tmp_path / "bundles", crun="/nonexistent/crun")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "crun.log").write_text("an earlier failure\nanother one\n")
    since = runner._crun_log_size(bundle)
    with open(bundle / "crun.log", "a") as f:
        f.write("the real reason\n")
    error = runner._crun_error(bundle, "crun kill c 15 failed", "", since)
    assert str(error).endswith("crun kill c 15 failed: the real reason")

"""The sandbox layer's model: the state table, records and their JSON (this release's and the
previous one's), and the store's index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvmsandbox.errors import IllegalTransition, NotFound
from kvmsandbox.sandbox.records import ContainerRecord, SandboxRecord
from kvmsandbox.sandbox.states import TRANSITIONS, ContainerState, SandboxState, move
from kvmsandbox.sandbox.store import SandboxStore

SCHEMA0 = Path(__file__).parent / "data" / "state-schema0.json"


def sandbox(sid: str = "s1", state: SandboxState = SandboxState.READY) -> SandboxRecord:
    return SandboxRecord(
        id=sid,
        vm_name=f"kvmsandbox-{sid}",
        backend="qemu",
        accel="tcg",
        transport="virtio-serial",
        vcpus=1,
        memory_mib=256,
        hostname=sid,
        state=state,
    )


def container(cid: str, sid: str = "s1", state: ContainerState = ContainerState.CREATED) -> ContainerRecord:
    return ContainerRecord(id=cid, sandbox_id=sid, name=cid, state=state, args=["true"], lower_dirs=[])


def test_every_state_has_a_row_in_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(SandboxState) | set(ContainerState)
    for state, targets in TRANSITIONS.items():
        assert all(type(t) is type(state) for t in targets)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (SandboxState.BOOTING, SandboxState.READY),
        (SandboxState.READY, SandboxState.BROKEN),
        (SandboxState.READY, SandboxState.STOPPED),
        (SandboxState.BROKEN, SandboxState.STOPPED),
    ],
)
def test_a_legal_sandbox_transition_moves_the_record(start: SandboxState, end: SandboxState) -> None:
    record = sandbox(state=start)
    move(record, end)
    assert record.state is end


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (SandboxState.STOPPED, SandboxState.READY),
        (SandboxState.BROKEN, SandboxState.READY),
        (SandboxState.READY, SandboxState.BOOTING),
        (SandboxState.READY, SandboxState.READY),
    ],
)
def test_an_illegal_sandbox_transition_names_both_states(start: SandboxState, end: SandboxState) -> None:
    record = sandbox(state=start)
    with pytest.raises(IllegalTransition, match=f"sandbox s1 cannot go from {start.value} to {end.value}"):
        move(record, end)
    assert record.state is start
    assert IllegalTransition("x").grpc_code == "INTERNAL"


def test_containers_move_forward_only() -> None:
    c = container("c1")
    move(c, ContainerState.RUNNING)
    move(c, ContainerState.EXITED)
    with pytest.raises(IllegalTransition, match="container c1 cannot go from exited to running"):
        move(c, ContainerState.RUNNING)
    created = container("c2")
    move(created, ContainerState.EXITED)
    assert created.state is ContainerState.EXITED


def test_a_record_survives_its_json_form() -> None:
    record = sandbox()
    record.containers["c1"] = container("c1", state=ContainerState.RUNNING)
    record.containers["c1"].oom_killed = True
    record.network_requested = True
    data = json.loads(json.dumps(record.to_json()))
    assert data["state"] == "ready" and data["schema"] == 1 and data["containers"]["c1"]["state"] == "running"
    assert SandboxRecord.from_json(data) == record


def test_a_record_of_the_previous_release_loads_with_typed_fields() -> None:
    record = SandboxRecord.from_json(json.loads(SCHEMA0.read_text()))
    assert record.state is SandboxState.READY and record.schema == 1
    assert record.network is not None and record.network.ips == ["10.77.0.5"]
    assert record.network.port_mappings[0]["hostPort"] == 18080
    assert record.network_requested and not record.network_released
    web, hog = record.containers.values()
    assert web.state is ContainerState.RUNNING and not web.oom_killed and web.reason == ""
    assert hog.state is ContainerState.EXITED and hog.oom_killed and hog.reason == "sandbox stopped"
    # The CRI facts are not the sandbox layer's: they are gone from the record it writes back.
    written = record.to_json()
    assert "extra" not in written and "labels" not in written
    assert all("extra" not in c and "labels" not in c for c in written["containers"].values())


@pytest.mark.parametrize(
    ("network", "requested", "released", "made"),
    [({}, False, False, False), ({"pending": True}, True, False, False), (None, False, False, False)],
)
def test_previous_release_network_forms_load(
    network: dict[str, object] | None, requested: bool, released: bool, made: bool
) -> None:
    data = json.loads(SCHEMA0.read_text())
    data["network"] = network
    record = SandboxRecord.from_json(data)
    assert (record.network_requested, record.network_released, record.network is not None) == (
        requested,
        released,
        made,
    )


def write_record(root: Path, record: SandboxRecord) -> None:
    d = root / "sandboxes" / record.id
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps(record.to_json()))


def test_the_store_indexes_sandboxes_and_containers_without_reading_disk_again(tmp_path: Path) -> None:
    record = sandbox("s1")
    record.containers["c1"] = container("c1")
    write_record(tmp_path, record)
    store = SandboxStore(tmp_path)
    shutil.rmtree(tmp_path / "sandboxes" / "s1")
    assert store.get("s1") == record and store.sandbox_of("c1") == "s1"
    with pytest.raises(NotFound, match="container c9 not found"):
        store.sandbox_of("c9")


def test_readers_get_copies_and_only_save_changes_the_store(tmp_path: Path) -> None:
    store = SandboxStore(tmp_path)
    record = sandbox("s1")
    store.save(record)
    mine = store.get("s1")
    mine.containers["c1"] = container("c1")
    assert store.get("s1").containers == {}
    with pytest.raises(NotFound):
        store.sandbox_of("c1")
    store.save(mine)
    assert store.sandbox_of("c1") == "s1"
    del mine.containers["c1"]
    store.save(mine)
    with pytest.raises(NotFound):
        store.sandbox_of("c1")
    # And what was saved is what a new store (a restarted runtime) reads.
    assert SandboxStore(tmp_path).get("s1") == mine
    store.forget("s1")
    assert not store.exists("s1") and store.all() == []


def test_an_unreadable_record_is_reported_not_fatal(tmp_path: Path) -> None:
    write_record(tmp_path, sandbox("good"))
    bad = tmp_path / "sandboxes" / "bad"
    bad.mkdir()
    (bad / "state.json").write_text('{"id": "bad", "state": "dancing"}')
    worse = tmp_path / "sandboxes" / "worse"
    worse.mkdir()
    (worse / "state.json").write_text("{not json")
    store = SandboxStore(tmp_path)
    assert [r.id for r in store.all()] == ["good"]
    assert set(store.unreadable) == {"bad", "worse"}


def test_a_record_that_names_another_sandbox_than_its_directory_is_unreadable(tmp_path: Path) -> None:
    d = tmp_path / "sandboxes" / "s1"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps(sandbox("../../elsewhere").to_json()))
    store = SandboxStore(tmp_path)
    assert store.all() == [] and "s1" in store.unreadable
    # Its id and directory stay taken until it is removed.
    assert store.exists("s1") and store.is_unreadable("s1")
    store.forget("s1")
    assert not store.exists("s1")


def test_the_store_knows_every_container_id(tmp_path: Path) -> None:
    store = SandboxStore(tmp_path)
    record = sandbox("s1")
    record.containers["c1"] = container("c1")
    store.save(record)
    assert store.has_container("c1") and not store.has_container("c2")

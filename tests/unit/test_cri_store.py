"""The CRI store (typed, indexed, persisted atomically) and the migration of the previous release's
records into it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvmsandbox.cri.migrate import migrate_schema_0
from kvmsandbox.cri.store import CriContainer, CriPod, CriStore, MountInfo, PodMetadata
from kvmsandbox.errors import NotFound
from kvmsandbox.overhead.sizing import PodResources
from kvmsandbox.sandbox.store import SandboxStore

SCHEMA0 = Path(__file__).parent / "data" / "state-schema0.json"
POD_ID = "5f" * 32


def test_pods_and_containers_survive_a_restart(tmp_path: Path) -> None:
    store = CriStore(tmp_path)
    pod = CriPod(
        id="p1",
        metadata=PodMetadata(name="web", uid="u", namespace="ns", attempt=1),
        labels={"app": "web"},
        log_directory="/var/log/pods/x",
        declared_overhead=PodResources(memory_limit_in_bytes=1 << 20),
    )
    store.add_pod(pod)
    c = CriContainer(id="c1", pod_id="p1", name="nginx", mounts=(MountInfo("/data", "/srv", True),), stop_signal="QUIT")
    store.add_container(c)
    again = CriStore(tmp_path)
    assert again.pod("p1") == pod and again.container("c1") == c
    again.remove_container("c1")
    assert CriStore(tmp_path).container("c1") is None and CriStore(tmp_path).pod("p1") == pod
    again.remove_pod("p1")
    assert CriStore(tmp_path).pod_ids() == set()
    assert list((tmp_path / "cri").iterdir()) == []


def test_removing_an_unknown_pod_touches_no_file(tmp_path: Path) -> None:
    store = CriStore(tmp_path)
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    store.remove_pod("../victim")
    assert victim.exists()


def test_a_corrupt_file_is_skipped(tmp_path: Path) -> None:
    CriStore(tmp_path).add_pod(CriPod(id="p1"))
    (tmp_path / "cri" / "p2.json").write_text("{broken")
    assert CriStore(tmp_path).pod_ids() == {"p1"}


def state_dir_with_schema0_record(tmp_path: Path) -> Path:
    d = tmp_path / "sandboxes" / POD_ID
    d.mkdir(parents=True)
    shutil.copy(SCHEMA0, d / "state.json")
    return tmp_path


def test_the_previous_release_s_cri_facts_move_into_the_store(tmp_path: Path) -> None:
    state_dir = state_dir_with_schema0_record(tmp_path)
    sandboxes = SandboxStore(state_dir)
    store = CriStore(state_dir)
    assert migrate_schema_0(sandboxes.schema0_cri_facts, store) == [POD_ID]
    pod = store.pod(POD_ID)
    assert pod is not None
    assert pod.metadata == PodMetadata(name="web", uid="u1", namespace="default", attempt=2)
    assert pod.labels == {"app": "web"} and pod.annotations == {"a": "b"}
    assert pod.log_directory == "/var/log/pods/default_web_u1" and pod.runtime_handler == "kvmsandbox"
    assert pod.declared_overhead.memory_limit_in_bytes == 230686720
    web = store.container("a1" * 32)
    assert web is not None and web.pod_id == POD_ID and web.name == "web" and web.labels == {"container": "web"}
    assert web.image == "127.0.0.1:5000/busybox:latest" and web.stop_signal == "SIGQUIT"
    assert web.mounts == (MountInfo("/data", "/srv/data", True),)
    hog = store.container("b2" * 32)
    assert hog is not None and hog.attempt == 1 and hog.image == "busybox"
    # The sandbox layer rewrites the record without them; a restart after that migrates nothing
    # and loses nothing: the CRI store has them.
    sandboxes.save(sandboxes.get(POD_ID))
    again = SandboxStore(state_dir)
    assert again.schema0_cri_facts == {}
    assert migrate_schema_0(again.schema0_cri_facts, CriStore(state_dir)) == []
    assert CriStore(state_dir).pod(POD_ID) == pod
    assert again.get(POD_ID).hostname == "web" and len(again.get(POD_ID).containers) == 2


def test_a_pod_the_store_has_already_is_left_alone(tmp_path: Path) -> None:
    state_dir = state_dir_with_schema0_record(tmp_path)
    store = CriStore(state_dir)
    store.add_pod(CriPod(id=POD_ID, runtime_handler="mine"))
    assert migrate_schema_0(SandboxStore(state_dir).schema0_cri_facts, store) == []
    assert store.pod(POD_ID) == CriPod(id=POD_ID, runtime_handler="mine")


def test_facts_that_do_not_parse_are_skipped(tmp_path: Path) -> None:
    broken = {"extra": {"metadata": {"name": "x", "colour": "red"}}, "labels": {}, "containers": {}}
    store = CriStore(tmp_path)
    assert migrate_schema_0({"p1": broken, "p2": {"extra": {}, "labels": {}, "containers": {}}}, store) == ["p2"]
    assert store.pod_ids() == {"p2"}


def test_a_container_of_an_unknown_pod_is_refused_and_a_gone_pod_gets_no_file_back(tmp_path: Path) -> None:
    store = CriStore(tmp_path)
    with pytest.raises(NotFound, match="pod sandbox p9 not found"):
        store.add_container(CriContainer(id="c1", pod_id="p9"))
    store.add_pod(CriPod(id="p1"), [CriContainer(id="c1", pod_id="p1")])
    assert CriStore(tmp_path).container("c1") == CriContainer(id="c1", pod_id="p1")
    store.remove_pod("p1")
    store.remove_container("c1")
    assert list((tmp_path / "cri").iterdir()) == []


def test_retain_forgets_what_is_gone_but_keeps_pods_whose_records_cannot_be_read(tmp_path: Path) -> None:
    store = CriStore(tmp_path)
    store.add_pod(CriPod(id="live"), [CriContainer(id="c1", pod_id="live"), CriContainer(id="c2", pod_id="live")])
    store.add_pod(CriPod(id="gone"), [CriContainer(id="c3", pod_id="gone")])
    store.add_pod(CriPod(id="lost"), [CriContainer(id="c4", pod_id="lost")])
    store.retain({"live"}, {"c1"}, unknown_pods={"lost"})
    again = CriStore(tmp_path)
    assert again.pod_ids() == {"live", "lost"}
    assert [again.container(c) is not None for c in ("c1", "c2", "c3", "c4")] == [True, False, False, True]


def test_files_naming_another_pod_are_skipped_and_unknown_fields_ignored(tmp_path: Path) -> None:
    store = CriStore(tmp_path)
    store.add_pod(CriPod(id="p1"), [CriContainer(id="c1", pod_id="p1")])
    path = tmp_path / "cri" / "p1.json"
    data = json.loads(path.read_text())
    data["pod"]["colour"] = "red"
    data["containers"][0]["future_field"] = 1
    path.write_text(json.dumps(data))
    assert CriStore(tmp_path).container("c1") == CriContainer(id="c1", pod_id="p1")
    data["pod"]["id"] = "../p2"
    (tmp_path / "cri" / "p2.json").write_text(json.dumps(data))
    assert CriStore(tmp_path).pod_ids() == {"p1"}

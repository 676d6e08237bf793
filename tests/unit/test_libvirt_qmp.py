"""QMP through libvirt for container disks: QEMU's replies are untrusted and every call has a
deadline. libvirt's monitor calls are replaced by stand-ins that answer as a hostile QEMU would."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor import disks, libvirt_qmp
from kvmsandbox.hypervisor.disks import Disk


class FakeQemu:
    """Answers each QMP command with ``replies[command]`` (a string, as libvirt returns it)."""

    def __init__(self, replies: dict[str, str], hang: str = "") -> None:
        self.replies = replies
        self.hang = hang
        self.seen: list[str] = []
        self.release = threading.Event()

    def command(self, dom: Any, text: str, flags: int) -> str:
        name = json.loads(text)["execute"]
        self.seen.append(name)
        if name == self.hang:
            self.release.wait(10)
        return self.replies.get(name, '{"return": {}}')

    def with_files(self, dom: Any, text: str, files: list[int], flags: int) -> tuple[str, list[int]]:
        return self.command(dom, text, flags), []


@pytest.fixture
def qemu(monkeypatch: pytest.MonkeyPatch) -> FakeQemu:
    fake = FakeQemu({})
    monkeypatch.setattr(libvirt_qmp.libvirt_qemu, "qemuMonitorCommand", fake.command)
    monkeypatch.setattr(libvirt_qmp.libvirt_qemu, "qemuMonitorCommandWithFiles", fake.with_files)
    return fake


def never() -> None:
    raise AssertionError("QEMU answered: nothing to stop")


@pytest.mark.parametrize("reply", ['{"return": null}', '{"return": 5}', "[]", "not json", '{"neither": 1}', '"x"'])
def test_a_device_list_that_is_not_one_is_a_clean_error(qemu: FakeQemu, reply: str) -> None:
    qemu.replies["qom-list"] = reply
    with pytest.raises(HypervisorError):
        libvirt_qmp.devices(object(), never)


def test_errors_are_cut_and_odd_error_shapes_are_still_errors(qemu: FakeQemu) -> None:
    qemu.replies["add-fd"] = json.dumps({"error": "x" * 100_000})
    with pytest.raises(HypervisorError) as e:
        libvirt_qmp.run(object(), disks.qmp_attach(Disk(3, Path("/d"), True), 1003), never, fd=0)
    assert len(str(e.value)) < 2 * libvirt_qmp.MESSAGE_MAX
    qemu.replies["add-fd"] = '{"return": {}}'
    qemu.replies["device_add"] = json.dumps({"error": {"class": "GenericError", "desc": "Duplicate ID"}})
    with pytest.raises(HypervisorError, match="QEMU refused device_add: Duplicate ID"):
        libvirt_qmp.run(object(), disks.qmp_attach(Disk(3, Path("/d"), True), 1003), never, fd=0)


def test_removals_of_what_is_not_there_are_no_error(qemu: FakeQemu) -> None:
    qemu.replies["qom-list"] = '{"return": []}'
    qemu.replies["device_del"] = '{"error": {"desc": "Device \'disk-3\' not found"}}'
    qemu.replies["blockdev-del"] = '{"error": {"desc": "Failed to find node with node-name=\'disk-3\'"}}'
    libvirt_qmp.run(object(), disks.qmp_detach(3, 1003), never)
    assert qemu.seen == ["device_del", "qom-list", "blockdev-del", "blockdev-del", "remove-fd"]


def test_a_qemu_that_does_not_answer_is_stopped_and_the_call_fails(
    qemu: FakeQemu, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libvirt_qmp, "QMP_TIMEOUT", 0.2)
    qemu.hang = "device_del"
    stopped: list[bool] = []

    def stop() -> None:
        stopped.append(True)
        qemu.release.set()  # as QEMU's death ends libvirt's wait

    with pytest.raises(HypervisorError, match="did not answer device_del"):
        libvirt_qmp.run(object(), disks.qmp_detach(3, 1003), stop)
    assert stopped == [True]

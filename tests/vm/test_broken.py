"""A sandbox whose agent cannot be reached becomes BROKEN: listed, not ready, its containers at
their last known state, and stop and remove still release everything (real guests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmsandbox.errors import KvmSandboxError
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.states import ContainerState, SandboxState
from tests.vm.leaks import mounts_below, processes_mentioning

pytestmark = pytest.mark.vm


def test_an_agent_unreachable_after_a_restart_makes_the_sandbox_broken_and_stop_and_remove_still_work(
    manager: SandboxManager, busybox_layer: Path
) -> None:
    record = manager.create_sandbox(hostname="to-break")
    again: SandboxManager | None = None
    try:
        c = manager.create_container(record.id, lower_dirs=[busybox_layer], process=ProcessSpec(args=["sleep", "600"]))
        manager.start_container(record.id, c.id)
        manager.close()
        # The agent's channel goes away while the runtime is down: QEMU still runs, nobody answers.
        assert record.transport == "virtio-serial", "these machines have no vhost-vsock"
        Path(record.agent_socket).unlink()
        again = SandboxManager(manager.config, manager.hypervisor, manager.image)
        again.recover()

        broken = again.get_sandbox(record.id)
        assert broken.state is SandboxState.BROKEN
        assert "agent not reachable" in broken.broken_reason
        assert [r.state for r in again.list_sandboxes() if r.id == record.id] == [SandboxState.BROKEN]
        # Its containers report their last known state; nothing is asked of the guest.
        assert again.refresh(record.id).containers[c.id].state is ContainerState.RUNNING
        for call in (
            lambda: again.client(record.id),
            lambda: again.create_container(record.id, lower_dirs=[busybox_layer], process=ProcessSpec(args=["true"])),
            lambda: again.exec_sync(record.id, c.id, ["true"]),
        ):
            with pytest.raises(KvmSandboxError) as e:
                call()
            assert e.value.grpc_code == "FAILED_PRECONDITION" and "broken" in str(e.value)

        again.stop_sandbox(record.id)
        stopped = again.get_sandbox(record.id)
        assert stopped.state is SandboxState.STOPPED
        assert stopped.containers[c.id].state is ContainerState.EXITED and stopped.containers[c.id].exit_code == 255
        assert stopped.containers[c.id].reason == "sandbox stopped"
        assert processes_mentioning(record.vm_name) == []
        sandbox_dir = again.sandbox_dir(record.id)
        assert mounts_below(sandbox_dir)
        again.destroy_sandbox(record.id)
        assert mounts_below(sandbox_dir) == []
        assert not sandbox_dir.exists() and not again.run_dir(record.id).exists()
    finally:
        if again is not None:
            again.close()
        manager.destroy_sandbox(record.id)
    assert manager.hypervisor.info(record.vm_name) is None


def test_a_broken_sandbox_is_removed_without_a_stop(manager: SandboxManager, busybox_layer: Path) -> None:
    record = manager.create_sandbox(hostname="broken-remove")
    try:
        c = manager.create_container(record.id, lower_dirs=[busybox_layer], process=ProcessSpec(args=["sleep", "600"]))
        manager.start_container(record.id, c.id)
        manager.mark_broken(record.id, "test: the agent misbehaved")
        assert manager.get_sandbox(record.id).broken_reason == "test: the agent misbehaved"
        # Marking again (or marking a sandbox that is not ready) changes nothing.
        manager.mark_broken(record.id, "again")
        assert manager.get_sandbox(record.id).broken_reason == "test: the agent misbehaved"
        sandbox_dir = manager.sandbox_dir(record.id)
        assert mounts_below(sandbox_dir)
    finally:
        manager.destroy_sandbox(record.id)
    assert processes_mentioning(record.vm_name) == []
    assert mounts_below(sandbox_dir) == [] and not sandbox_dir.exists()


def test_a_container_the_runtime_did_not_live_to_record_is_removed_at_recovery(
    manager: SandboxManager, busybox_layer: Path
) -> None:
    record = manager.create_sandbox(hostname="orphan")
    again: SandboxManager | None = None
    try:
        sleep = ProcessSpec(args=["sleep", "600"])
        kept = manager.create_container(record.id, lower_dirs=[busybox_layer], process=sleep)
        lost = manager.create_container(record.id, lower_dirs=[busybox_layer], process=sleep)
        manager.start_container(record.id, kept.id)
        # As a kill between the guest's create and the record's save leaves it.
        saved = manager.ctx.store.get(record.id)
        del saved.containers[lost.id]
        manager.ctx.store.save(saved)
        manager.close()
        again = SandboxManager(manager.config, manager.hypervisor, manager.image)
        again.recover()
        assert {i.id for i in again.client(record.id).list_containers()} == {kept.id}
        sandbox_dir = again.sandbox_dir(record.id)
        assert [m for m in mounts_below(sandbox_dir) if lost.id in m] == []
        assert again.refresh(record.id).containers[kept.id].state is ContainerState.RUNNING
    finally:
        if again is not None:
            again.close()
        manager.destroy_sandbox(record.id)

"""Container root filesystems as disks, on real guests: what a container writes stays in its
disk image, layers are shared by the pod and go with their last user, nothing is left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.host import confinement
from kvmsandbox.hypervisor.builder import SECCOMP_SANDBOX
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.records import SandboxRecord
from kvmsandbox.sandbox.types import HostMount
from tests.vm.leaks import mounts_below
from tests.waiting import wait_until

# As root in the container: a setuid-root shell, a world-writable copy of /dev/mem and of a disk,
# a FIFO, a link out of the tree and 8 MiB of data, each in the container's writable layer.
PLANT = (
    "cp /bin/busybox /suid; chmod 4755 /suid; mknod -m 666 /mem c 1 1; mknod -m 666 /disk b 8 0; "
    "mkfifo /fifo; ln -s / /root-link; dd if=/dev/zero of=/data bs=1M count=8 2>/dev/null; sync; "
    "touch /planted; sleep 600"
)


def sh(script: str) -> ProcessSpec:
    return ProcessSpec(args=["sh", "-c", script])


def special_files_below(root: Path) -> list[str]:
    """Setuid/setgid files, device nodes, FIFOs and sockets below ``root`` (links not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID) or not (
                stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)
            ):
                found.append(os.path.join(dirpath, name))
    return found


def test_what_a_container_writes_stays_inside_its_disk_image(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    c = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh(PLANT))
    try:
        manager.start_container(sandbox.id, c.id)
        wait_until(
            lambda: manager.exec_sync(sandbox.id, c.id, ["test", "-e", "/planted"]).exit_code == 0, 60, "the plants"
        )
        listing = manager.exec_sync(sandbox.id, c.id, ["ls", "-l", "/suid", "/mem", "/disk", "/fifo"], timeout=30)
        assert listing.exit_code == 0, listing.stderr  # root in the container made them all
        sdir = manager.sandbox_dir(sandbox.id)
        # On the host there is the disk image, 0600, and nothing the guest made.
        assert special_files_below(sdir) == []
        assert not any(p.name in ("suid", "mem", "disk", "fifo", "root-link") for p in sdir.rglob("*"))
        image = sdir / "disks" / f"{c.id}.ext4"
        assert stat.S_IMODE(image.stat().st_mode) == 0o600 and image.stat().st_uid == 0
        assert mounts_below(sdir / "disks") == []
        # The writable layer's usage is the image's growth, seen by the host.
        usage = wait_until(
            lambda: u if (u := manager.writable_layer(sandbox.id, c.id)).used_bytes >= 8 << 20 else None,
            30,
            "the writable layer to hold the 8 MiB",
        )
        assert usage.used_bytes < 64 << 20
        # The image layer itself was never written.
        assert not (busybox_layer / "suid").exists()
    finally:
        manager.stop_container(sandbox.id, c.id, grace=0)
        manager.remove_container(sandbox.id, c.id)
    assert not (manager.sandbox_dir(sandbox.id) / "disks" / f"{c.id}.ext4").exists()


def test_a_layer_is_attached_once_per_pod_and_stays_for_the_next_container(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    a = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("sleep 600"))
    b = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("sleep 600"))
    record = manager.get_sandbox(sandbox.id)
    layer_target = record.layer_disks[os.path.realpath(busybox_layer)]
    assert list(record.layer_disks.values()) == [layer_target]
    targets = {record.containers[a.id].writable_target, record.containers[b.id].writable_target}
    assert len(targets) == 2 and layer_target not in targets
    manager.remove_container(sandbox.id, a.id)
    manager.start_container(sandbox.id, b.id)
    assert manager.exec_sync(sandbox.id, b.id, ["cat", "/etc/passwd"]).exit_code == 0
    manager.stop_container(sandbox.id, b.id, grace=0)
    manager.remove_container(sandbox.id, b.id)
    # No container uses it: it stays attached (the guest unmounted it), and the next container of
    # the image mounts it again from the same disk.
    assert manager.get_sandbox(sandbox.id).layer_disks == {os.path.realpath(busybox_layer): layer_target}
    c = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("cat /etc/passwd"))
    manager.start_container(sandbox.id, c.id)
    status = manager.wait_container(sandbox.id, c.id, 60)
    assert status is not None and status.exit_code == 0
    manager.remove_container(sandbox.id, c.id)


def test_a_readonly_rootfs_has_no_writable_disk(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path
) -> None:
    c = manager.create_container(
        sandbox.id, lower_dirs=[busybox_layer], process=sh("touch /x; echo $?"), readonly_rootfs=True
    )
    try:
        assert manager.get_sandbox(sandbox.id).containers[c.id].writable_target == 0
        assert not (manager.sandbox_dir(sandbox.id) / "disks" / f"{c.id}.ext4").exists()
        manager.start_container(sandbox.id, c.id)
        status = manager.wait_container(sandbox.id, c.id, 60)
        assert status is not None and status.exit_code == 0
        assert manager.wait_output(sandbox.id, c.id, 30)
        assert "1" in Path(c.log_path).read_text()
    finally:
        manager.remove_container(sandbox.id, c.id)


def test_a_failed_create_leaves_no_disk_and_no_attached_layer(
    manager: SandboxManager, sandbox: SandboxRecord, busybox_layer: Path, tmp_path: Path
) -> None:
    # The host path is checked after the disks are attached: the create fails half way.
    missing = [HostMount(tmp_path / "missing", "/m")]
    with pytest.raises(InvalidArgument, match="does not exist"):
        manager.create_container(sandbox.id, "doomed", lower_dirs=[busybox_layer], process=sh("true"), mounts=missing)
    record = manager.get_sandbox(sandbox.id)
    assert "doomed" not in record.containers
    assert not (manager.sandbox_dir(sandbox.id) / "disks" / "doomed.ext4").exists()
    # The targets it had are free and usable again.
    c = manager.create_container(sandbox.id, lower_dirs=[busybox_layer], process=sh("true"))
    manager.remove_container(sandbox.id, c.id)


def test_qemu_runs_as_its_own_uid_without_capabilities_under_a_seccomp_filter_on_both_backends(
    manager: SandboxManager, sandbox: SandboxRecord
) -> None:
    pid = manager.hypervisor.info(sandbox.vm_name).pid  # type: ignore[union-attr]
    vmm = confinement.of_process(pid)
    assert vmm is not None and vmm.vm_name == sandbox.vm_name
    assert vmm.seccomp == 2
    # The strictest filter QEMU has (no fork, no exec, no setuid) on both backends.
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-sandbox") + 1] == SECCOMP_SANDBOX.encode()
    # A uid and gid of its own (no other VMM has it), no capabilities, a mount namespace of its own.
    base = manager.config.hypervisor.vmm_uid_base
    assert base <= vmm.uid < base + (1 << 20) and vmm.capabilities == 0 and vmm.own_mount_namespace
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"Gid:\t{vmm.uid}\t{vmm.uid}\t{vmm.uid}\t{vmm.uid}" in status and "NoNewPrivs:\t1" in status
    others = [v for v in confinement.running_vmms() if v.pid != pid]
    assert vmm.uid not in {v.uid for v in others}
    if manager.config.hypervisor.backend == "qemu":
        # Without -daemonize (it forks once the filter is in place), and nobody's child here.
        assert b"-daemonize" not in argv
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid != os.getpid()
        # Jailed: a root holding only /usr, devices and its kernel; a network namespace of its own.
        seen = set(os.listdir(f"/proc/{pid}/root"))
        allowed = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "sbin", "usr", "vm"}
        assert {"dev", "usr", "vm"} <= seen <= allowed
        assert sorted(os.listdir(f"/proc/{pid}/root/vm")) == ["initrd", "kernel"]
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    else:
        # libvirt's private /dev holds only what the VM uses: not the host's.
        assert set(os.listdir(f"/proc/{pid}/root/dev")) != set(os.listdir("/dev"))
    assert vmm in confinement.running_vmms()


def test_a_pod_booted_without_the_scsi_controller_keeps_the_host_overlay(
    manager: SandboxManager, busybox_layer: Path
) -> None:
    record = manager.create_sandbox(hostname="earlier-release")
    try:
        # As an earlier release recorded its pods (and booted their VMs): no SCSI controller.
        old = manager.ctx.store.get(record.id)
        old.scsi_disks = False
        manager.ctx.store.save(old)
        c = manager.create_container(record.id, lower_dirs=[busybox_layer], process=sh("echo still-works"))
        assert manager.get_sandbox(record.id).containers[c.id].layer_keys == []
        assert (manager.sandbox_dir(record.id) / "shared" / "containers" / c.id / "bin").is_dir()
        manager.start_container(record.id, c.id)
        status = manager.wait_container(record.id, c.id, 60)
        assert status is not None and status.exit_code == 0
        manager.remove_container(record.id, c.id)
    finally:
        manager.destroy_sandbox(record.id)

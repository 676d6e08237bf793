"""Container disks on the libvirt backend, added and removed with QMP through libvirt (as the qemu
backend does over its own socket): the runtime opens each image and passes the fd
(``qemuMonitorCommandWithFiles``, ``add-fd``), so QEMU, running as an unprivileged uid of its own,
never needs to reach the path, and libvirt keeps no copy of the fd.

Disks attached by an earlier release through libvirt's attach-device (alias ``ua-disk-<target>``)
are removed through libvirt.
"""

from __future__ import annotations

import json
import time
from typing import Any

import libvirt
import libvirt_qemu

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor import disks

# Seconds one disk's attach or detach may take (a device_del completes when QEMU has unplugged it).
QMP_TIMEOUT = 15.0
# fd sets of container disks: libvirt numbers its own from 0 (the console log is set 0).
FDSET_BASE = 1000


def fdset(target: int) -> int:
    return FDSET_BASE + target


def devices(dom: Any) -> set[str]:
    """The ids of the devices QEMU has (user-made ones: ours and libvirt's aliases)."""
    reply = _call(dom, {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}})
    if "error" in reply:
        raise HypervisorError(f"QEMU refused qom-list: {reply['error']}")
    return {str(c.get("name")) for c in reply.get("return", []) if isinstance(c, dict)}


def run(dom: Any, commands: list[dict[str, Any]], *, fd: int | None = None, tolerate_all: bool = False) -> None:
    """Runs ``commands`` in order; with ``fd``, first passes it to QEMU in the fd set of the disk
    the commands attach. A removal of something not there is no error (nor is anything with
    ``tolerate_all``); a node still in use after its device's unplug is retried.

    Raises:
        HypervisorError: QEMU refused a command, or it did not finish within QMP_TIMEOUT.
    """
    deadline = time.monotonic() + QMP_TIMEOUT
    if fd is not None:
        target = next(int(c["arguments"]["scsi-id"]) for c in commands if c["execute"] == "device_add")
        add = {"execute": "add-fd", "arguments": {"fdset-id": fdset(target)}}
        try:
            reply = libvirt_qemu.qemuMonitorCommandWithFiles(dom, json.dumps(add), [fd], 0)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt: cannot pass a disk's fd to QEMU: {e}") from e
        answer = json.loads(reply[0])
        if "error" in answer:
            raise HypervisorError(f"QEMU refused add-fd: {answer['error'].get('desc', answer['error'])}")
    for command in commands:
        while True:
            error = _call(dom, command).get("error")
            if error is None:
                break
            message = str(error.get("desc", error)) if isinstance(error, dict) else str(error)
            if command["execute"] == "blockdev-del" and "is in use" in message and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            removal = command["execute"] in disks.REMOVALS
            if tolerate_all or (removal and any(t in message for t in disks.NOT_THERE)):
                break
            raise HypervisorError(f"QEMU refused {command['execute']}: {message}")
        if command["execute"] == "device_del":
            _wait_gone(dom, str(command["arguments"]["id"]), deadline)


def _wait_gone(dom: Any, device_id: str, deadline: float) -> None:
    while device_id in devices(dom):
        if time.monotonic() > deadline:
            raise HypervisorError(f"QEMU still has device {device_id} {QMP_TIMEOUT:.0f} s after its unplug")
        time.sleep(0.02)


def _call(dom: Any, command: dict[str, Any]) -> dict[str, Any]:
    try:
        reply: dict[str, Any] = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0))
    except libvirt.libvirtError as e:
        # libvirt itself may turn a QMP error into an exception: the same message, the same rules.
        return {"error": {"desc": str(e)}}
    return reply

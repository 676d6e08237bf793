"""Container disks on the libvirt backend, added and removed with QMP through libvirt (as the qemu
backend does over its own socket): the runtime opens each image and passes the fd
(``qemuMonitorCommandWithFiles``, ``add-fd``), so QEMU, running as an unprivileged uid of its own,
never needs to reach the path, and libvirt keeps no copy of the fd.

QEMU's replies are untrusted: their shape is checked, their text cut, and every call has a
deadline (libvirt's own monitor calls have none): a QEMU that does not answer in time is killed
(``on_timeout``), which ends the call. Disks attached by an earlier release through libvirt's
attach-device (alias ``ua-disk-<target>``) are removed through libvirt (the backend).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt
import libvirt_qemu

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor import disks

# Seconds one disk's attach or detach may take (a device_del completes when QEMU has unplugged it).
QMP_TIMEOUT = 15.0
# fd sets of container disks: libvirt numbers its own from 0 (the console log is set 0).
FDSET_BASE = 1000
# What is kept of a message from QEMU in an error.
MESSAGE_MAX = 1024
# libvirt errors that mean the domain is gone: a removal has nothing left to remove.
GONE = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)


class DomainGone(HypervisorError):
    """The domain went away during the call."""


def fdset(target: int) -> int:
    return FDSET_BASE + target


def devices(dom: Any, on_timeout: Callable[[], None]) -> set[str]:
    """The ids of the devices QEMU has (user-made ones: ours and libvirt's aliases).

    Raises:
        HypervisorError: QEMU refused, answered nonsense or not in time. DomainGone.
    """
    reply = _call(dom, {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}, on_timeout)
    children = reply.get("return")
    if "error" in reply or not isinstance(children, list):
        raise HypervisorError(f"QEMU gave no device list: {_text(reply.get('error', reply))}")
    return {str(c.get("name"))[:256] for c in children[:4096] if isinstance(c, dict)}


def run(
    dom: Any,
    commands: list[dict[str, Any]],
    on_timeout: Callable[[], None],
    *,
    fd: int | None = None,
    tolerate_all: bool = False,
) -> None:
    """Runs ``commands`` in order; with ``fd``, first passes it to QEMU in the fd set of the disk
    the commands attach. A removal of something not there is no error (nor is anything with
    ``tolerate_all``); a node still in use after its device's unplug is retried.

    Raises:
        HypervisorError: QEMU refused a command, answered nonsense, or the whole did not finish
        within QMP_TIMEOUT. DomainGone: the domain went away.
    """
    deadline = time.monotonic() + QMP_TIMEOUT
    if fd is not None:
        target = next(int(c["arguments"]["scsi-id"]) for c in commands if c["execute"] == "device_add")
        add = {"execute": "add-fd", "arguments": {"fdset-id": fdset(target)}}
        error = _call(dom, add, on_timeout, fd=fd).get("error")
        if error is not None:
            raise HypervisorError(f"QEMU refused add-fd: {_text(error)}")
    for command in commands:
        while True:
            error = _call(dom, command, on_timeout).get("error")
            if error is None:
                break
            message = _text(error)
            if command["execute"] == "blockdev-del" and "is in use" in message and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            removal = command["execute"] in disks.REMOVALS
            if tolerate_all or (removal and any(t in message for t in disks.NOT_THERE)):
                break
            raise HypervisorError(f"QEMU refused {command['execute']}: {message}")
        if command["execute"] == "device_del":
            device_id = str(command["arguments"]["id"])
            while device_id in devices(dom, on_timeout):
                if time.monotonic() > deadline:
                    raise HypervisorError(f"QEMU still has device {device_id} {QMP_TIMEOUT:.0f} s after its unplug")
                time.sleep(0.02)


def _call(
    dom: Any, command: dict[str, Any], on_timeout: Callable[[], None], *, fd: int | None = None
) -> dict[str, Any]:
    """One QMP command through libvirt, in a thread of its own so that it has a deadline: at the
    deadline QEMU is killed (``on_timeout``), which makes libvirt return.

    Raises:
        HypervisorError: no answer in time, or one that is not a JSON object. DomainGone.
    """
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            text = json.dumps(command)
            if fd is None:
                result["reply"] = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
            else:
                result["reply"] = libvirt_qemu.qemuMonitorCommandWithFiles(dom, text, [fd], 0)[0]
        except libvirt.libvirtError as e:
            result["error"] = e

    worker = threading.Thread(target=call, name="libvirt-qmp", daemon=True)
    worker.start()
    worker.join(QMP_TIMEOUT)
    if worker.is_alive():
        on_timeout()
        worker.join(QMP_TIMEOUT)
        raise HypervisorError(f"QEMU did not answer {command['execute']} within {QMP_TIMEOUT:.0f} s: it was stopped")
    error = result.get("error")
    if isinstance(error, libvirt.libvirtError):
        if error.get_error_code() in GONE:
            raise DomainGone(f"the VM went away during {command['execute']}")
        # libvirt itself may turn a QMP error into an exception: the same message, the same rules.
        return {"error": {"desc": str(error)}}
    try:
        reply = json.loads(result["reply"])
    except (ValueError, TypeError, KeyError):
        reply = None
    if not isinstance(reply, dict) or not ("return" in reply or "error" in reply):
        raise HypervisorError(f"QEMU answered {command['execute']} with something that is not a QMP reply")
    return reply


def _text(error: Any) -> str:
    """QEMU's message (its ``desc``), cut to MESSAGE_MAX characters."""
    if isinstance(error, dict):
        error = error.get("desc", error)
    return str(error)[:MESSAGE_MAX]

"""What the qemu backend prepares before QEMU starts: every file, socket and device QEMU uses,
opened here and passed as fds (so QEMU needs no access to any runtime path), and, when confined,
the jail command line that runs QEMU as a uid of its own in a mount namespace of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmsandbox.errors import HypervisorError
from kvmsandbox.hypervisor.builder import QemuFds
from kvmsandbox.hypervisor.spec import QMP_SOCKET_NAME, VMSpec
from kvmsandbox.hypervisor.uids import kvm_group

JAIL_SCRIPT = Path(__file__).with_name("jail.py")
JAIL_DIR_NAME = "jail"
VHOST_VSOCK = "/dev/vhost-vsock"
TUN = "/dev/net/tun"
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


@dataclass
class Opened:
    """The fds opened for one QEMU (closed here once QEMU has its copies)."""

    fds: QemuFds
    owned: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.owned.clear()


@contextlib.contextmanager
def opened_for(spec: VMSpec, *, jailed: bool) -> Iterator[Opened]:
    """Opens what QEMU of ``spec`` uses; closes the runtime's copies on leaving.

    Raises:
        HypervisorError: something could not be opened (which, and why).
    """
    owned: list[int] = []
    try:
        qmp = _listener(spec.run_dir / QMP_SOCKET_NAME, owned)
        agent = vhost = shared = tap = None
        if spec.agent is not None and spec.agent.socket_path is not None:
            agent = _listener(spec.agent.socket_path, owned)
        elif spec.agent is not None:
            vhost = _open(Path(VHOST_VSOCK), os.O_RDWR, owned)
        if spec.shared_fs_socket is not None:
            shared = _connected(spec.shared_fs_socket, owned)
        if spec.nic is not None:
            tap = _tap(spec.nic.tap, owned)
        memory = incoming = None
        if spec.template is not None:
            memory = _dup(spec.template.memory_fd, owned)
            if spec.template.role == "clone" and spec.template.state_fd is not None:
                _check_sealed(memory)
                incoming = _reopen(spec.template.state_fd, owned)
        fds = QemuFds(
            qmp=qmp,
            console=_open(spec.console_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, owned),
            root_disk=_open(spec.root_disk, os.O_RDONLY, owned),
            kernel="/vm/kernel" if jailed else str(spec.kernel),
            initrd="/vm/initrd" if jailed else str(spec.initrd),
            agent=agent,
            vhost_vsock=vhost,
            shared_fs=shared,
            tap=tap,
            memory=memory,
            incoming=incoming,
        )
    except BaseException:
        for fd in owned:
            os.close(fd)
        raise
    opened = Opened(fds, owned)
    try:
        yield opened
    finally:
        opened.close()


def _open(path: Path, flags: int, owned: list[int]) -> int:
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise HypervisorError(f"cannot open {path} for QEMU: {e.strerror}") from None
    owned.append(fd)
    return fd


def _dup(fd: int, owned: list[int]) -> int:
    try:
        owned.append(os.dup(fd))
    except OSError as e:
        raise HypervisorError(f"cannot pass the template's memory to QEMU: {e.strerror}") from None
    return owned[-1]


def _check_sealed(fd: int) -> None:
    """A clone's QEMU gets its template's memory only sealed against every write."""
    wanted = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise HypervisorError(f"the template's memory is not a sealed memfd: {e.strerror}") from None
    if seals & wanted != wanted:
        raise HypervisorError(f"the template's memory is not sealed against writes (seals {seals:#x})")


def _reopen(fd: int, owned: list[int]) -> int:
    """A new open file of what ``fd`` is, with an offset of its own (QEMU reads it from the start)."""
    try:
        owned.append(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as e:
        raise HypervisorError(f"cannot reopen the template's state: {e.strerror}") from None
    return owned[-1]


def _listener(path: Path, owned: list[int]) -> int:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(8)
    except OSError as e:
        sock.close()
        raise HypervisorError(f"cannot listen on {path} for QEMU: {e.strerror}") from None
    owned.append(sock.detach())
    return owned[-1]


def _connected(path: Path, owned: list[int]) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise HypervisorError(f"cannot connect to virtiofsd at {path}: {e.strerror}") from None
    owned.append(sock.detach())
    return owned[-1]


def _tap(name: str, owned: list[int]) -> int:
    fd = _open(Path(TUN), os.O_RDWR, owned)
    request = struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, request)
    except OSError as e:
        raise HypervisorError(f"cannot attach to tap device {name}: {e.strerror}") from None
    return fd


def jail_argv(spec: VMSpec, uid: int, qemu_argv: list[str]) -> list[str]:
    """``qemu_argv`` run through the jail (jail.py) as ``uid``, with the VM's kernel and initrd
    and, for KVM, /dev/kvm (and its group)."""
    root = spec.run_dir / JAIL_DIR_NAME
    root.mkdir(mode=0o700, exist_ok=True)
    devices, groups = [], []
    if spec.accel == "kvm":
        devices.append("kvm")
        groups.append(kvm_group())
    files = {"kernel": str(spec.kernel), "initrd": str(spec.initrd)}
    binary = qemu_argv[0]
    if not os.path.realpath(binary).startswith("/usr/"):
        files["qemu"] = os.path.realpath(binary)  # a QEMU outside /usr (a build of its own)
        binary = "/vm/qemu"
    plan = {
        "root": str(root),
        "uid": uid,
        "gid": uid,
        "groups": groups,
        "files": files,
        "devices": devices,
        # A template's or clone's RAM is named /proc/self/fd/N: its own processes only.
        "proc": spec.template is not None,
        "argv": [binary, *qemu_argv[1:]],
    }
    return [sys.executable, "-I", "-S", str(JAIL_SCRIPT), json.dumps(plan)]

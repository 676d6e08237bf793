"""Sandbox-wide guest setup: sysctls, hostname, network, DNS and hosts files, shared storages, the
shared process namespace."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from pathlib import Path

from kvmsandbox.agent.guest import clone
from kvmsandbox.agent.guest.errors import AgentFault, InvalidArgument
from kvmsandbox.agent.guest.network import configure_network
from kvmsandbox.agent.guest.podns import PodPidNamespace, apply_sysctls
from kvmsandbox.agent.guest.reaper import Reaper
from kvmsandbox.agent.linux import MNT_DETACH, MS_NODEV, MS_NOEXEC, MS_NOSUID, mount, umount
from kvmsandbox.agent.v1 import agent_pb2 as pb

SANDBOX_DIR = Path("/run/kvmsandbox/sandbox")
STORAGE_DRIVERS = ("virtiofs",)


def resolv_conf(dns: pb.DNSConfig) -> str:
    """/etc/resolv.conf text for a DNS config (the guest's own when none is given)."""
    lines = [f"nameserver {s}" for s in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n" if lines else ""


def pod_ip(interfaces: Sequence[pb.Interface]) -> str:
    """The first address of the first interface, without its prefix length ("" without one)."""
    if not interfaces or not interfaces[0].addresses:
        return ""
    return interfaces[0].addresses[0].partition("/")[0]


def hosts_file(hostname: str, extra: list[pb.HostEntry], ip: str = "") -> str:
    """/etc/hosts text: localhost, the hostname on the pod IP (on 127.0.1.1 without one), then the
    pod's host aliases."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    # As the kubelet's managed hosts file: the hostname on the pod IP, or on 127.0.1.1 without one
    # (both would let a resolver prefer the loopback address).
    if hostname and ip:
        lines.append(f"{ip}\t{hostname}")
    elif hostname:
        lines.append(f"127.0.1.1\t{hostname}")
    lines += [f"{e.ip}\t{' '.join(e.names)}" for e in extra]
    return "\n".join(lines) + "\n"


class SandboxSetup:
    """What CreateSandbox did, so DestroySandbox can undo it."""

    def __init__(self, reaper: Reaper) -> None:
        self.mounted: list[str] = []
        self.sandbox_id = ""
        self.pid_namespace = PodPidNamespace(reaper)

    def create(self, req: pb.CreateSandboxRequest) -> pb.CreateSandboxResponse:
        """Sets the hostname, configures the network, writes the sysctls and the files containers
        get, mounts the storages, starts the shared process namespace.

        Raises:
            InvalidArgument: a sysctl, storage, interface or route is malformed (or a sysctl
            refused). AgentFault: a NIC is missing, an ``ip`` command, a mount or the pause failed.
        """
        if req.HasField("clone"):
            clone.apply(req.clone)
        self.sandbox_id = req.sandbox_id
        SANDBOX_DIR.mkdir(parents=True, exist_ok=True)
        hostname = req.hostname or req.sandbox_id[:12] or "sandbox"
        try:
            socket.sethostname(hostname)
        except OSError as e:
            raise AgentFault(f"cannot set hostname {hostname!r}: {e}") from None
        if req.interfaces:
            configure_network(req.interfaces, req.routes)
        # After the network (per-interface keys name the pod's NICs), before any container runs.
        apply_sysctls(req.sysctls)
        paths = {
            "hostname": SANDBOX_DIR / "hostname",
            "hosts": SANDBOX_DIR / "hosts",
            "resolv.conf": SANDBOX_DIR / "resolv.conf",
        }
        paths["hostname"].write_text(hostname + "\n")
        paths["hosts"].write_text(hosts_file(hostname, list(req.hosts), pod_ip(req.interfaces)))
        paths["resolv.conf"].write_text(resolv_conf(req.dns))
        for storage in req.storages:
            self._mount_storage(storage)
        shm = self._mount_shm()
        return pb.CreateSandboxResponse(
            hostname_path=str(paths["hostname"]),
            hosts_path=str(paths["hosts"]),
            resolv_conf_path=str(paths["resolv.conf"]),
            pid_namespace_path=self.pid_namespace.start() if req.share_pid_namespace else "",
            shm_path=shm,
        )

    def _mount_shm(self) -> str:
        """The pod's /dev/shm: a tmpfs of the size containerd gives one (64 MiB), made once."""
        path = SANDBOX_DIR / "shm"
        if str(path) not in self.mounted:
            path.mkdir(exist_ok=True)
            try:
                mount("shm", str(path), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
            except OSError as e:
                raise AgentFault(f"cannot mount the pod's /dev/shm: {e.strerror or e}") from None
            self.mounted.append(str(path))
        return str(path)

    def _mount_storage(self, storage: pb.Storage) -> None:
        if not storage.mount_point.startswith("/") or not storage.source:
            raise InvalidArgument(f"storage needs a source and an absolute mount point, got {storage}")
        if storage.driver not in STORAGE_DRIVERS:
            raise InvalidArgument(f"storage driver {storage.driver!r} is not one of {', '.join(STORAGE_DRIVERS)}")
        if storage.mount_point in self.mounted:
            return
        Path(storage.mount_point).mkdir(parents=True, exist_ok=True)
        try:
            mount(storage.source, storage.mount_point, storage.driver, 0, ",".join(storage.options))
        except OSError as e:
            raise AgentFault(str(e.strerror or e)) from None
        self.mounted.append(storage.mount_point)

    def destroy(self) -> None:
        """Ends the shared process namespace; unmounts the storages (lazily: a process may still
        hold a file)."""
        self.pid_namespace.stop()
        for target in reversed(self.mounted):
            with contextlib.suppress(OSError):
                umount(target, MNT_DETACH)
        self.mounted.clear()

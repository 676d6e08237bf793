"""A pod's network: its namespace, the CNI interface in it, and the tap that carries the traffic to
the guest.

Per pod the runtime makes a network namespace and runs CNI ADD in it (the plugins make `eth0`
there, with the pod's IP). The guest's virtio NIC is backed by a tap device: the runtime creates it
on the host, QEMU opens it by name at start, then the runtime moves it into the pod's namespace
and joins it to `eth0` with tc mirred redirects both ways (as Kata does). The guest NIC gets
`eth0`'s MAC, so neighbours on the pod network see one address, and the agent gives it the CNI
addresses, routes and MTU. Nothing routes or bridges inside the namespace: frames pass through.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvmsandbox.agent.v1 import agent_pb2 as pb
from kvmsandbox.config import Config
from kvmsandbox.errors import KvmSandboxError, NetworkError
from kvmsandbox.hypervisor.spec import Nic
from kvmsandbox.network import netns
from kvmsandbox.network.cni import CniRunner, PortMapping
from kvmsandbox.network.cni_config import NetworkConfigList, load_network_config

log = logging.getLogger(__name__)

POD_IFNAME = "eth0"
GUEST_IFNAME = "eth0"


def _ip(*args: str, timeout: float = 30) -> str:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {e}") from None
    if proc.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _tc(ns: str, *args: str) -> None:
    try:
        proc = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworkError(f"`tc {' '.join(args)}` failed: {e}") from None
    if proc.returncode != 0:
        raise NetworkError(f"`tc -n {ns} {' '.join(args)}` failed: {proc.stderr.strip()}")


def make_tap(name: str) -> None:
    """A persistent tap in this namespace (QEMU attaches to it by name). Raises NetworkError."""
    _ip("tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr")


def delete_link(name: str) -> None:
    """Removes the link ``name`` of this namespace if it exists. Raises NetworkError."""
    if link_exists(name):
        _ip("link", "del", "dev", name)


def link_exists(name: str, ns: str | None = None) -> bool:
    where = ["-n", ns] if ns else []
    return subprocess.run(["ip", *where, "link", "show", "dev", name], capture_output=True, check=False).returncode == 0


@dataclass
class PodNetwork:
    """What the runtime made for one pod, kept in its sandbox record for teardown and status."""

    netns: str
    tap: str
    mac: str
    mtu: int
    # Addresses with prefix, e.g. "10.88.0.5/16"; the first IPv4 one is the pod IP.
    addresses: list[str] = field(default_factory=list)
    # {"destination": ..., "gateway": ...}
    routes: list[dict[str, str]] = field(default_factory=list)
    network_name: str = ""
    port_mappings: list[dict[str, Any]] = field(default_factory=list)
    # The CNI config list the network was added with: DEL runs with it, as libcni does, even if
    # the node's config changed since.
    cni_config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PodNetwork:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def ips(self) -> list[str]:
        """Pod IPs without prefix, IPv4 first (the CRI's ip, then additional_ips)."""
        plain = [a.split("/")[0] for a in self.addresses]
        return sorted(plain, key=lambda a: ":" in a)

    def nic(self) -> Nic:
        return Nic(tap=self.tap, mac=self.mac, mtu=self.mtu)

    def guest_interfaces(self) -> list[pb.Interface]:
        return [pb.Interface(name=GUEST_IFNAME, mac=self.mac, addresses=self.addresses, mtu=self.mtu)]

    def guest_routes(self) -> list[pb.Route]:
        return [
            pb.Route(destination=r["destination"], gateway=r.get("gateway", ""), interface=GUEST_IFNAME)
            for r in self.routes
        ]


@dataclass(frozen=True)
class NetworkStatus:
    ready: bool
    reason: str
    message: str


class PodNetworking:
    """Sets pod networks up and tears them down through the node's CNI config."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def _runner(self, cached: dict[str, Any] | None = None) -> CniRunner:
        if cached:
            conf = NetworkConfigList(
                name=cached["name"],
                cni_version=cached["cni_version"],
                plugins=cached["plugins"],
                source=Path(cached["source"]),
                raw=cached["raw"],
            )
        else:
            conf = load_network_config(list(self.config.network.cni_conf_dirs))
        runner = CniRunner(conf, list(self.config.network.cni_bin_dirs), self.config.cni_cache_dir)
        runner.check_plugins()
        return runner

    def status(self) -> NetworkStatus:
        """Ready when a CNI config loads and its plugins exist (the CRI's NetworkReady condition)."""
        try:
            runner = self._runner()
        except KvmSandboxError as e:
            return NetworkStatus(False, "NetworkPluginNotReady", f"CNI is not ready: {e}")
        return NetworkStatus(True, "", f"CNI network {runner.config.name!r} from {runner.config.source}")

    @staticmethod
    def names(sandbox_id: str) -> tuple[str, str]:
        """The pod's namespace and tap names (the tap name must fit in 15 bytes)."""
        return f"kvmsandbox-{sandbox_id[:16]}", f"kvt{sandbox_id[:12]}"

    def setup(
        self, sandbox_id: str, port_mappings: list[PortMapping], args: dict[str, str], adopt_tap: str = ""
    ) -> PodNetwork:
        """Namespace, CNI ADD, and the tap QEMU will open (or ``adopt_tap``, a tap a waiting VM
        has open already, renamed to the pod's). On failure everything made is undone.

        Raises:
            NetworkError: no usable CNI config, a plugin failed, or the tap could not be made.
        """
        runner = self._runner()
        ns_name, tap = self.names(sandbox_id)
        ns_path = netns.create_netns(ns_name, exist_ok=True)
        try:
            runner.run_loopback(ns_path)
            result = runner.add(sandbox_id, ns_path, POD_IFNAME, port_mappings, args)
            pod_if = result.pod_interface()
            link = json.loads(_ip("-n", ns_name, "-j", "link", "show", "dev", POD_IFNAME))[0]
            mac = (pod_if.mac or link["address"]).lower()
            gateways = [ip.gateway for ip in result.pod_ips() if ip.gateway]
            routes = [
                {
                    "destination": r.dst,
                    "gateway": r.gw or next((g for g in gateways if (":" in g) == (":" in r.dst)), ""),
                }
                for r in result.routes
            ]
            network = PodNetwork(
                netns=ns_name,
                tap=tap,
                mac=mac,
                mtu=int(link.get("mtu", 0)),
                addresses=[ip.address for ip in result.pod_ips()],
                routes=routes,
                network_name=runner.config.name,
                port_mappings=[asdict(p) for p in port_mappings],
                cni_config={
                    "name": runner.config.name,
                    "cni_version": runner.config.cni_version,
                    "plugins": runner.config.plugins,
                    "source": str(runner.config.source),
                    "raw": runner.config.raw,
                },
            )
            if not network.addresses:
                raise NetworkError(f"CNI network {runner.config.name!r} gave the pod no IP address")
            if link_exists(tap):
                _ip("link", "del", "dev", tap)
            if adopt_tap:
                _ip("link", "set", "dev", adopt_tap, "name", tap)
            else:
                make_tap(tap)
            return network
        except BaseException:
            # The error that matters is the one that stopped the setup; a failing undo is logged.
            try:
                self.teardown(sandbox_id, None, remove_netns=True, retry_later=False)
            except KvmSandboxError as e:
                log.warning("sandbox %s: undoing its half-made network failed too: %s", sandbox_id, e)
                self.forget(sandbox_id)
            raise

    def attach(self, network: PodNetwork) -> None:
        """After QEMU opened the tap: moves it into the pod's namespace and joins it to the CNI
        interface with tc mirred redirects both ways.

        Raises:
            NetworkError: a step failed (the caller tears the pod down).
        """
        ns = network.netns
        _ip("link", "set", "dev", network.tap, "netns", ns)
        mtu = ["mtu", str(network.mtu)] if network.mtu else []
        _ip("-n", ns, "link", "set", "dev", network.tap, *mtu, "up")
        for src, dst in ((POD_IFNAME, network.tap), (network.tap, POD_IFNAME)):
            _tc(ns, "qdisc", "add", "dev", src, "ingress")
            _tc(
                ns, "filter", "add", "dev", src, "parent", "ffff:", "protocol", "all",
                "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", dst,
            )  # fmt: skip

    def forget(self, sandbox_id: str) -> None:
        """Drops the CNI state cached for a pod that goes away although its DEL failed."""
        for path in self.config.cni_cache_dir.glob(f"*-{sandbox_id}.json"):
            path.unlink(missing_ok=True)

    def teardown(
        self, sandbox_id: str, network: PodNetwork | None, *, remove_netns: bool, retry_later: bool = True
    ) -> None:
        """CNI DEL (idempotent; also for a half-made network), the host-side tap if it never moved,
        and with ``remove_netns`` the namespace (which takes the tap and the pod's end of the veth
        with it) once DEL succeeded. Failures are logged and the rest still runs; the last one is
        raised."""
        ns_name, tap = self.names(sandbox_id)
        if network is not None:
            ns_name, tap = network.netns, network.tap
        problem: KvmSandboxError | None = None
        try:
            runner = self._runner(network.cni_config if network is not None else None)
        except (KvmSandboxError, KeyError, TypeError) as e:
            log.warning("sandbox %s: no CNI config to release its network with: %s", sandbox_id, e)
            problem = e if isinstance(e, KvmSandboxError) else NetworkError(f"the cached CNI config is unusable: {e!r}")
        else:
            try:
                ns_path = netns.netns_path(ns_name)
                runner.delete(sandbox_id, ns_path if ns_path.exists() else None, POD_IFNAME)
            except KvmSandboxError as e:
                log.warning("sandbox %s: CNI DEL failed: %s", sandbox_id, e)
                problem = e
        if link_exists(tap):
            try:
                _ip("link", "del", "dev", tap)
            except NetworkError as e:
                problem = e
        # With a retry to come, the namespace stays while DEL has not succeeded: some plugins
        # (bridge's ipMasq rules) can only clean up with it.
        if remove_netns and (problem is None or not retry_later):
            try:
                netns.delete_netns(ns_name)
            except KvmSandboxError as e:
                problem = e
        if problem is not None:
            raise problem

"""The CNI runner and network namespaces with the host's real plugins (bridge, host-local, portmap,
loopback) in real namespaces: addresses and routes, pod-to-pod traffic, port mappings, and that DEL
leaves no lease, veth or iptables rule behind, in either teardown order; broken configs fail with
the plugin's own words and roll back.

Every test has its own namespaces, bridge, 10.250.x.0/24 subnet, host-local data dir and cache,
and a fixture that removes whatever is left even when DEL did not (the assertions check DEL).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvmsandbox.errors import AlreadyExists, InvalidArgument, NetworkError
from kvmsandbox.network import netns
from kvmsandbox.network.cni import CniRunner, PortMapping
from kvmsandbox.network.cni_config import load_network_config
from kvmsandbox.network.cni_result import CniResult

PLUGINS = Path("/usr/lib/cni")
PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]
# portmap's chains shared by all containers: it never removes them, and they are not ours to remove.
SHARED_CHAINS = {"CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK", "CNI-FORWARD", "CNI-ADMIN"}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (PLUGINS / "bridge").exists() or not (shutil.which("ping") or shutil.which("busybox")),
    reason="needs root, the CNI plugins in /usr/lib/cni and ping (or busybox)",
)

# A plugin that records what it was given and passes its prevResult on; "failAdd" makes ADD fail.
RECORDER = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
with open(conf["logFile"], "a") as f:
    f.write(json.dumps({{"conf": conf, "env": env}}) + "\\n")
if env["CNI_COMMAND"] == "ADD" and conf.get("failAdd"):
    error = {{"cniVersion": conf["cniVersion"], "code": 111, "msg": "recorder refuses", "details": "asked to fail"}}
    print(json.dumps(error))
    sys.exit(1)
if env["CNI_COMMAND"] == "ADD":
    print(json.dumps(conf["prevResult"]))
"""


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30).stdout


def iptables_save() -> str:
    return sh("iptables-save")


def mentioning(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def veths_on(bridge: str) -> list[str]:
    """Host interfaces enslaved to ``bridge`` (the host ends of the pods' veths)."""
    return sh("ip", "-o", "link", "show", "master", bridge, check=False).splitlines()


def ns_links(ns: str) -> list[str]:
    return [link["ifname"] for link in json.loads(sh("ip", "-n", ns, "-j", "link", "show"))]


def remove_rules(needles: list[str]) -> None:
    """Deletes iptables rules that mention any of ``needles``, and the per-container chains they jump to."""
    for table in ("nat", "filter", "mangle"):
        chains: list[str] = []
        for line in sh("iptables-save", "-t", table, check=False).splitlines():
            if not line.startswith("-A ") or not any(n in line for n in needles):
                continue
            argv = shlex.split(line)
            if "-j" in argv:
                target = argv[argv.index("-j") + 1]
                if target.startswith("CNI-") and target not in SHARED_CHAINS and target not in chains:
                    chains.append(target)
            sh("iptables", "-t", table, "-D", *argv[1:], check=False)
        for chain in chains:
            sh("iptables", "-t", table, "-F", chain, check=False)
            sh("iptables", "-t", table, "-X", chain, check=False)


@dataclass
class Pod:
    ns: str
    path: Path
    cid: str


@dataclass
class Net:
    """One test's network: a bridge + host-local (+ portmap) config list and its runner."""

    token: str
    tmp: Path
    bridge: str
    subnet: ipaddress.IPv4Network
    data_dir: Path
    conf_dir: Path
    pods: list[Pod] = field(default_factory=list)
    runners: list[CniRunner] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"kvt-{self.token}"

    @property
    def leases_dir(self) -> Path:
        return self.data_dir / self.name

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def bridge_plugin(self, subnet: str | None = None) -> dict[str, Any]:
        return {
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipMasq": True,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet or str(self.subnet)}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.data_dir),
            },
        }

    def runner(
        self, *extra: dict[str, Any], subnet: str | None = None, bin_dirs: list[Path] | None = None
    ) -> CniRunner:
        """A runner for bridge + ``extra`` plugins, from a conflist written into the conf dir."""
        conflist = {"cniVersion": "1.0.0", "name": self.name, "plugins": [self.bridge_plugin(subnet), *extra]}
        (self.conf_dir / "10-test.conflist").write_text(json.dumps(conflist))
        runner = CniRunner(load_network_config([self.conf_dir]), bin_dirs or [PLUGINS], self.tmp / "cache")
        runner.check_plugins()
        self.runners.append(runner)
        return runner

    def pod(self) -> Pod:
        n = len(self.pods)
        name = f"kvt-{self.token}-{n}"
        pod = Pod(name, netns.create_netns(name), f"kvtest{self.token}{n}")
        self.pods.append(pod)
        return pod

    def leases(self) -> list[str]:
        """host-local's lease files (one per address, named by it), without its lock and last_reserved_ip.*"""
        if not self.leases_dir.exists():
            return []
        return sorted(p.name for p in self.leases_dir.iterdir() if _is_ip(p.name))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


PORTMAP = {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
_used_subnets: set[int] = set()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    routes = sh("ip", "-4", "route", "show", "table", "all")
    free = [x for x in range(1, 255) if x not in _used_subnets and f"10.250.{x}." not in routes]
    x = random.choice(free)
    _used_subnets.add(x)
    token = secrets.token_hex(3)
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    network = Net(
        token=token,
        tmp=tmp_path,
        bridge=f"kvt{token}",
        subnet=ipaddress.IPv4Network(f"10.250.{x}.0/24"),
        data_dir=tmp_path / "ipam",
        conf_dir=conf_dir,
    )
    yield network
    for pod in network.pods:
        for runner in network.runners:
            with contextlib.suppress(NetworkError, InvalidArgument):
                runner.delete(pod.cid, pod.path if pod.path.exists() else None)
        netns.delete_netns(pod.ns)
    sh("ip", "link", "del", "dev", network.bridge, check=False)
    remove_rules([network.token, str(network.subnet)])


def add(runner: CniRunner, pod: Pod, mappings: list[PortMapping] | None = None) -> CniResult:
    runner.run_loopback(pod.path)
    return runner.add(
        pod.cid, pod.path, "eth0", mappings or [], {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": pod.ns}
    )


def assert_released(net: Net, pod: Pod, ip: str, pods_left: int = 0) -> None:
    """What DEL must have undone: the lease, the host end of the veth, every iptables rule."""
    assert not (net.leases_dir / ip).exists()
    assert len(net.leases()) == pods_left
    assert all(not (net.leases_dir / lease).read_text().startswith(pod.cid) for lease in net.leases())
    assert len(veths_on(net.bridge)) == pods_left
    dump = iptables_save()
    assert mentioning(dump, pod.cid) == []
    assert mentioning(dump, f"{ip}/32") == []
    assert mentioning(dump, f"{ip}:") == []
    assert not (net.tmp / "cache" / f"{net.name}-{pod.cid}.json").exists()


def test_add_gives_an_address_routes_and_pod_to_pod_traffic(net: Net) -> None:
    runner = net.runner(PORTMAP)
    a, b = net.pod(), net.pod()
    result_a, result_b = add(runner, a), add(runner, b)

    pod_if = result_a.pod_interface()
    assert (pod_if.name, pod_if.sandbox) == ("eth0", str(a.path))
    link = json.loads(sh("ip", "-n", a.ns, "-j", "link", "show", "eth0"))[0]
    assert pod_if.mac.lower() == link["address"].lower()
    assert any(i.name == net.bridge and not i.sandbox for i in result_a.interfaces)
    [ip_a] = result_a.pod_ips()
    [ip_b] = result_b.pod_ips()
    addr_a, addr_b = ipaddress.ip_interface(ip_a.address), ipaddress.ip_interface(ip_b.address)
    assert addr_a.network == net.subnet and addr_b.network == net.subnet
    assert addr_a.ip != addr_b.ip
    assert ip_a.gateway == net.gateway
    assert [r.dst for r in result_a.routes] == ["0.0.0.0/0"]
    assert result_a.cni_version == "1.0.0"
    assert ip_a.address in sh("ip", "-n", a.ns, "-o", "addr", "show", "eth0")
    assert f"default via {net.gateway} dev eth0" in sh("ip", "-n", a.ns, "route")
    assert "UP" in sh("ip", "-n", a.ns, "-o", "link", "show", "lo")  # the loopback plugin ran

    # The cache holds ADD's result and inputs, for DEL.
    cached = json.loads((net.tmp / "cache" / f"{net.name}-{a.cid}.json").read_text())
    assert cached["result"] == result_a.raw and cached["netns"] == str(a.path) and cached["ifname"] == "eth0"
    assert sorted(net.leases()) == sorted([str(addr_a.ip), str(addr_b.ip)])
    assert len(veths_on(net.bridge)) == 2

    netns.run_in_netns(a.ns, [*PING, "-c1", "-W2", net.gateway])
    netns.run_in_netns(a.ns, [*PING, "-c1", "-W2", str(addr_b.ip)])
    netns.run_in_netns(b.ns, [*PING, "-c1", "-W2", str(addr_a.ip)])

    runner.delete(a.cid, a.path)
    runner.delete(b.cid, b.path)
    assert net.leases() == []
    assert veths_on(net.bridge) == []
    assert ns_links(a.ns) == ["lo"]
    for pod, addr in ((a, addr_a), (b, addr_b)):
        netns.delete_netns(pod.ns)
        assert_released(net, pod, str(addr.ip))


def test_port_mappings_make_rules_that_del_removes(net: Net) -> None:
    runner = net.runner(PORTMAP)
    pod = net.pod()
    port = 18080 + random.randrange(1000)
    mappings = [PortMapping(port, 80, "TCP", "127.0.0.1"), PortMapping(port + 1, 81, "udp")]
    [ip] = add(runner, pod, mappings).pod_ips()
    pod_ip = str(ipaddress.ip_interface(ip.address).ip)

    nat = sh("iptables-save", "-t", "nat")
    ours = mentioning(nat, pod.cid)
    assert any(f"--dports {port}" in line for line in ours)  # portmap's jump to the container's chain
    assert any(f"--dports {port + 1}" in line and "-p udp" in line for line in ours)
    assert any(f"-s {pod_ip}/32" in line for line in ours)  # bridge's ipMasq
    assert f"-d 127.0.0.1/32 -p tcp -m tcp --dport {port} -j DNAT --to-destination {pod_ip}:80" in nat
    assert f"-p udp -m udp --dport {port + 1} -j DNAT --to-destination {pod_ip}:81" in nat
    # The container's own chains: bridge's ipMasq chain and portmap's DNAT chain.
    chains = {target for line in ours if (target := shlex.split(line)[-1]).startswith("CNI-")} - SHARED_CHAINS
    assert len(chains) == 2

    # The mapping on 127.0.0.1 works from the host (portmap lets the bridge route localnet).
    server = subprocess.Popen(
        ["ip", "netns", "exec", pod.ns, sys.executable, "-c", LISTENER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.settimeout(5)
            assert conn.recv(100) == b"hello"
    finally:
        server.kill()
        server.wait()
    assert sh("sysctl", "-n", f"net.ipv4.conf.{net.bridge}.route_localnet").strip() == "1"

    runner.delete(pod.cid, pod.path)
    after = iptables_save()
    assert mentioning(after, f"--dport {port}") == [] and mentioning(after, f"--dports {port}") == []
    existing = {line.split()[0][1:] for line in after.splitlines() if line.startswith(":")}
    assert chains.isdisjoint(existing)
    netns.delete_netns(pod.ns)
    assert_released(net, pod, pod_ip)


LISTENER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen()
print("ready", flush=True)
s.settimeout(10)
c, _ = s.accept()
c.sendall(b"hello")
c.close()
"""


def test_del_twice_and_del_after_the_netns_is_gone(net: Net) -> None:
    runner = net.runner(PORTMAP)
    port = 19200 + random.randrange(1000)
    first, second = net.pod(), net.pod()
    ip_first = str(ipaddress.ip_interface(add(runner, first).pod_ips()[0].address).ip)
    ip_second = str(ipaddress.ip_interface(add(runner, second, [PortMapping(port, 80)]).pod_ips()[0].address).ip)

    runner.delete(first.cid, first.path)
    runner.delete(first.cid, first.path)  # DEL again: nothing left to do, and no error
    netns.delete_netns(first.ns)
    runner.delete(first.cid)  # and once more, with neither cache nor namespace
    assert_released(net, first, ip_first, pods_left=1)
    runner.delete("kvtest-never-added")  # a container that never was is fine too

    # The other order: the namespace goes first (its end of the veth with it), then DEL, which
    # passes no namespace; the lease and the port mappings (known from the cache) still go.
    netns.delete_netns(second.ns)
    assert not netns.netns_exists(second.ns)
    runner.delete(second.cid)
    assert net.leases() == []
    assert veths_on(net.bridge) == []
    dump = iptables_save()
    assert mentioning(dump, f"--dports {port}") == [] and mentioning(dump, f"{ip_second}:80") == []
    # bridge <= 1.1.1 can only find its ipMasq rules through the interface in the namespace, so
    # here they stay (the fixture removes them): DEL before deleting the namespace.
    assert not (net.tmp / "cache" / f"{net.name}-{second.cid}.json").exists()


def test_chain_gets_name_version_prev_result_capabilities_and_args(net: Net, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kvt-recorder").write_text(RECORDER.format(python=sys.executable))
    (bin_dir / "kvt-recorder").chmod(0o755)
    log = tmp_path / "recorder.log"
    recorder = {
        "type": "kvt-recorder",
        "logFile": str(log),
        "capabilities": {"portMappings": True, "bandwidth": True, "ips": False},
    }
    runner = net.runner(recorder, bin_dirs=[bin_dir, PLUGINS])
    pod = net.pod()
    result = runner.add(
        pod.cid, pod.path, "eth0", [PortMapping(18000, 80, "TCP")], {"K8S_POD_NAMESPACE": "ns1", "K8S_POD_NAME": "p1"}
    )
    runner.delete(pod.cid, pod.path)
    runner.delete(pod.cid, pod.path)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["env"]["CNI_COMMAND"] for c in calls] == ["ADD", "DEL", "DEL"]

    add_call, del_call, second_del = calls
    assert add_call["conf"]["name"] == net.name and add_call["conf"]["cniVersion"] == "1.0.0"
    assert add_call["conf"]["prevResult"]["ips"] == result.raw["ips"]  # the bridge's result
    assert add_call["conf"]["runtimeConfig"] == {
        "portMappings": [{"hostPort": 18000, "containerPort": 80, "protocol": "tcp"}]
    }
    assert add_call["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": pod.cid,
        "CNI_NETNS": str(pod.path),
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p1",
        "CNI_PATH": f"{bin_dir}:{PLUGINS}",
    }
    # DEL repeats ADD's inputs from the cache, with the final result as prevResult.
    assert del_call["conf"]["prevResult"] == result.raw
    assert del_call["conf"]["runtimeConfig"] == add_call["conf"]["runtimeConfig"]
    assert del_call["env"]["CNI_ARGS"] == add_call["env"]["CNI_ARGS"]
    # Once DEL succeeded the cache is gone: the next DEL has no prevResult nor port mappings.
    assert "prevResult" not in second_del["conf"] and "runtimeConfig" not in second_del["conf"]
    assert net.leases() == []


def test_a_failing_plugin_is_reported_and_the_chain_rolled_back(net: Net, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kvt-recorder").write_text(RECORDER.format(python=sys.executable))
    (bin_dir / "kvt-recorder").chmod(0o755)
    log = tmp_path / "recorder.log"
    runner = net.runner({"type": "kvt-recorder", "logFile": str(log), "failAdd": True}, bin_dirs=[bin_dir, PLUGINS])
    pod = net.pod()
    with pytest.raises(NetworkError) as e:
        runner.add(pod.cid, pod.path)
    assert "recorder refuses: asked to fail (CNI error code 111)" in str(e.value)
    assert "'kvt-recorder'" in str(e.value) and pod.cid in str(e.value)
    assert "undoing" not in str(e.value)
    # DEL ran for the failed plugin, then for the bridge: no interface, veth or lease is left.
    assert [json.loads(line)["env"]["CNI_COMMAND"] for line in log.read_text().splitlines()] == ["ADD", "DEL"]
    assert ns_links(pod.ns) == ["lo"]
    assert veths_on(net.bridge) == []
    assert net.leases() == []
    assert mentioning(iptables_save(), pod.cid) == []
    assert not (net.tmp / "cache" / f"{net.name}-{pod.cid}.json").exists()


def test_an_ipam_error_is_reported_in_the_plugins_words(net: Net) -> None:
    runner = net.runner(subnet="10.250.0.0/33")
    pod = net.pod()
    with pytest.raises(NetworkError) as e:
        runner.add(pod.cid, pod.path)
    assert "invalid CIDR address: 10.250.0.0/33" in str(e.value)
    assert "'bridge'" in str(e.value)
    assert ns_links(pod.ns) == ["lo"]  # bridge made eth0 before asking IPAM; the rollback removed it
    assert veths_on(net.bridge) == []
    assert net.leases() == []


def test_a_plugin_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    (bin_dir / "kvt-hang").write_text('#!/bin/sh\n[ "$CNI_COMMAND" = ADD ] && exec sleep 60\nexit 0\n')
    (bin_dir / "kvt-hang").chmod(0o755)
    (conf_dir / "a.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "hang", "type": "kvt-hang"}))
    runner = CniRunner(load_network_config([conf_dir]), [bin_dir], tmp_path / "cache")
    name = f"kvt-hang-{secrets.token_hex(3)}"
    try:
        started = time.monotonic()
        with pytest.raises(NetworkError, match=r"'kvt-hang' could not add .* did not finish within 0\.5 s"):
            runner.add("kvtesthang", netns.create_netns(name), timeout=0.5)
        assert time.monotonic() - started < 5
    finally:
        netns.delete_netns(name)
    assert not (tmp_path / "cache" / "hang-kvtesthang.json").exists()  # the undo (DEL) succeeded


def test_broken_configs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NetworkError, match=r"no CNI network config .* in .*empty"):
        load_network_config([empty, tmp_path / "missing"])

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "10-bad.conflist").write_text('{"cniVersion": "1.0.0", "name": "x", "plugins": [')
    with pytest.raises(NetworkError, match=r"10-bad\.conflist is not valid JSON"):
        load_network_config([bad])

    for name, text, words in [
        ("a.conflist", {"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}, "no network name"),
        ("b.conflist", {"cniVersion": "1.0.0", "name": "x"}, "has no plugins"),
        ("c.conflist", {"cniVersion": "1.0.0", "name": "x", "plugins": []}, "has no plugins"),
        ("d.conflist", {"cniVersion": "1.0.0", "name": "x", "plugins": [{"bridge": "b"}]}, "does not say its type"),
        ("e.conflist", {"name": "x", "plugins": [{"type": "bridge"}]}, "does not say its CNI version"),
        ("f.conflist", {"cniVersion": "1.0.0", "name": "a/b", "plugins": [{"type": "bridge"}]}, "network name"),
    ]:
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name).write_text(json.dumps(text))
        with pytest.raises(NetworkError, match=words) as e:
            load_network_config([d])
        assert str(d / name) in str(e.value)

    d = tmp_path / "missing-plugin"
    d.mkdir()
    plugins = [{"type": "bridge", "ipam": {"type": "kvt-no-ipam"}}, {"type": "kvt-no-such-plugin"}]
    (d / "x.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "x", "plugins": plugins}))
    runner = CniRunner(load_network_config([d]), [tmp_path / "nobin", PLUGINS], tmp_path / "cache")
    with pytest.raises(NetworkError) as e:
        runner.check_plugins()
    message = str(e.value)
    assert "kvt-no-ipam, kvt-no-such-plugin" in message and str(PLUGINS) in message and "nobin" in message
    assert "bridge," not in message


def test_load_picks_the_lexically_first_file_and_lifts_a_conf_to_a_list(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "README").write_text("not a config")
    (second / "99-last.conflist").write_text(
        json.dumps({"cniVersion": "0.4.0", "name": "z", "plugins": [{"type": "a"}]})
    )
    (second / "20-b.conflist").write_text(json.dumps({"cniVersion": "0.4.0", "name": "b", "plugins": [{"type": "a"}]}))
    (second / "10-a.conf").write_text(json.dumps({"cniVersion": "0.3.1", "name": "a", "type": "bridge", "mtu": 1400}))
    (second / "05-x.txt").write_text("ignored")
    config = load_network_config([tmp_path / "absent", first, second])
    assert config.source == second / "10-a.conf"
    assert (config.name, config.cni_version) == ("a", "0.3.1")
    assert [p["type"] for p in config.plugins] == ["bridge"] and config.plugins[0]["mtu"] == 1400

    (second / "00-z.json").write_text(json.dumps({"cniVersion": "1.0.0", "name": "j", "plugins": [{"type": "a"}]}))
    config = load_network_config([second])
    assert config.source.name == "00-z.json" and config.name == "j" and config.plugins == [{"type": "a"}]


def test_results_of_older_versions_parse() -> None:
    v040 = {
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"}, {"name": "eth0", "mac": "b2:00", "sandbox": "/x"}],
        "ips": [
            {"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 1},
            {"version": "4", "address": "10.9.0.1/16", "interface": 0},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.1.0.10"]},
    }
    result = CniResult.from_json(v040)
    assert result.pod_interface().name == "eth0"
    assert [ip.address for ip in result.pod_ips()] == ["10.1.0.5/16"]
    assert result.dns_nameservers == ["10.1.0.10"] and result.routes[0].gw == ""

    v020 = {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.2.0.7/24", "gateway": "10.2.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
    }
    old = CniResult.from_json(v020)
    assert [ip.address for ip in old.pod_ips()] == ["10.2.0.7/24"] and old.routes[0].dst == "0.0.0.0/0"
    with pytest.raises(NetworkError, match="no interface inside"):
        old.pod_interface()
    with pytest.raises(NetworkError, match="address"):
        CniResult.from_json({"cniVersion": "1.0.0", "ips": [{"gateway": "10.0.0.1"}]})


def test_netns_helpers() -> None:
    name = f"kvt-ns-{secrets.token_hex(3)}"
    try:
        path = netns.create_netns(name)
        assert path == Path("/run/netns", name) == netns.netns_path(name) and netns.netns_exists(name)
        with pytest.raises(AlreadyExists):
            netns.create_netns(name)
        assert netns.create_netns(name, exist_ok=True) == path
        assert "lo" in netns.run_in_netns(name, ["ip", "-o", "link"])
        with pytest.raises(NetworkError, match=r"kvt-missing0.*failed: .*does not exist"):
            netns.run_in_netns(name, ["ip", "link", "show", "kvt-missing0"])
    finally:
        netns.delete_netns(name)
    assert not netns.netns_exists(name)
    netns.delete_netns(name)  # again: nothing to do
    for bad in ("", "a/b", "..", "x" * 65, "a b"):
        with pytest.raises(InvalidArgument):
            netns.netns_path(bad)

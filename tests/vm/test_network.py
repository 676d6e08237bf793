"""A pod network on both backends: the guest NIC gets the CNI address, the host reaches it, and
removal leaves no namespace, tap or lease."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmsandbox.config import NetworkConfig
from kvmsandbox.errors import NotFound, Unavailable
from kvmsandbox.network.pod import PodNetworking
from kvmsandbox.sandbox.manager import SandboxManager
from kvmsandbox.sandbox.oci_spec import ProcessSpec
from kvmsandbox.sandbox.states import ContainerState, SandboxState
from kvmsandbox.sandbox.types import NetworkRequest
from tests.cri.conftest import write_cni_config

pytestmark = pytest.mark.vm
# Apart from the CRI tests' network: their pods may still run while these do.
BRIDGE = "kvsbtest1"
SUBNET = "10.78.1.0/24"


@pytest.fixture
def net_manager(manager: SandboxManager, tmp_path: Path) -> Iterator[SandboxManager]:
    """The session's manager (same hypervisor and guest image) with a pod network of its own."""
    conf = write_cni_config(tmp_path / "net.d", tmp_path / "ipam", BRIDGE, SUBNET)
    config = dataclasses.replace(
        manager.config, state_dir=tmp_path / "state", network=NetworkConfig(cni_conf_dirs=[conf])
    )
    m = SandboxManager(config, manager.hypervisor, manager.image)
    yield m
    for record in m.list_sandboxes():
        m.destroy_sandbox(record.id)
    m.close()
    subprocess.run(["ip", "link", "del", "dev", BRIDGE], capture_output=True, check=False)


def test_a_pod_gets_its_cni_address_in_the_guest_and_leaves_nothing(
    net_manager: SandboxManager, busybox_layer: Path, tmp_path: Path
) -> None:
    m = net_manager
    record = m.create_sandbox(hostname="net-vm", network=NetworkRequest(port_mappings=[], args={}))
    assert record.network is not None
    address = record.network.addresses[0]
    ip = address.split("/")[0]
    c = m.create_container(record.id, lower_dirs=[busybox_layer], process=ProcessSpec(args=["sleep", "600"]))
    m.start_container(record.id, c.id)
    out = m.exec_sync(record.id, c.id, ["ip", "-o", "addr", "show", "eth0"])
    assert f"inet {address}" in out.stdout.decode()
    route = m.exec_sync(record.id, c.id, ["ip", "route"]).stdout.decode()
    assert route.startswith("default via ")
    ping = subprocess.run(["busybox", "ping", "-c", "2", "-W", "5", ip], capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    hosts = m.exec_sync(record.id, c.id, ["cat", "/etc/hosts"]).stdout.decode()
    assert f"{ip}\tnet-vm" in hosts

    netns, tap = record.network.netns, record.network.tap
    # The node's config changes under a running pod: its DEL still runs with the config it was
    # added with.
    for f in (tmp_path / "net.d").iterdir():
        f.write_text("{ broken")
    m.destroy_sandbox(record.id)
    assert not Path("/run/netns", netns).exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert tap not in links
    assert not [p for p in (tmp_path / "ipam").rglob("*") if p.name == ip]


def test_a_network_that_cannot_be_released_keeps_the_pod_until_a_retry_succeeds(
    net_manager: SandboxManager, busybox_layer: Path, tmp_path: Path
) -> None:
    m = net_manager
    record = m.create_sandbox(hostname="net-retry", network=NetworkRequest(port_mappings=[], args={}))
    assert record.network is not None
    ip = record.network.addresses[0].split("/")[0]
    c = m.create_container(record.id, lower_dirs=[busybox_layer], process=ProcessSpec(args=["sleep", "600"]))
    m.start_container(record.id, c.id)
    working = m.networking
    # The plugins vanish (a node upgrade in progress): DEL cannot run.
    m.ctx.networking = PodNetworking(
        dataclasses.replace(
            m.config, network=dataclasses.replace(m.config.network, cni_bin_dirs=[tmp_path / "no-plugins"])
        )
    )
    # Removed without a stop first: the VM goes, the pod stays listed, stopped, its container exited.
    with pytest.raises(Unavailable, match="not removed"):
        m.destroy_sandbox(record.id)
    kept = m.get_sandbox(record.id)
    assert kept.state is SandboxState.STOPPED and kept.network_released is False
    assert kept.containers[c.id].state is ContainerState.EXITED and kept.containers[c.id].exit_code == 255
    with pytest.raises(Unavailable, match="stopped, but network"):
        m.stop_sandbox(record.id)
    assert [p for p in (tmp_path / "ipam").rglob("*") if p.name == ip], "the lease is held until DEL runs"
    # The plugins are back: stopping again releases the network, removing finishes.
    m.ctx.networking = working
    m.stop_sandbox(record.id)
    assert m.get_sandbox(record.id).network_released is True
    assert not [p for p in (tmp_path / "ipam").rglob("*") if p.name == ip]
    m.destroy_sandbox(record.id)
    assert not Path("/run/netns", record.network.netns).exists()
    # The failed attempts kept the namespace, so DEL could remove the bridge's masquerade rule too.
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
    assert record.id not in nat
    with pytest.raises(NotFound):
        m.get_sandbox(record.id)

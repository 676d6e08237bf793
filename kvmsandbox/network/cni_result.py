"""Reads what a CNI plugin chain printed: its result (interfaces, addresses, routes, DNS) in the
shape of CNI 0.3.0 to 1.0.0, with 0.1.0 and 0.2.0 results converted to it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvmsandbox.errors import NetworkError


@dataclass(frozen=True)
class CniInterface:
    """An interface a plugin made; ``sandbox`` is the netns path, "" for host-side interfaces."""

    name: str
    mac: str
    sandbox: str


@dataclass(frozen=True)
class CniIP:
    """An address with prefix ("10.88.0.5/16"); ``interface`` indexes the result's interfaces."""

    address: str
    gateway: str
    interface: int | None


@dataclass(frozen=True)
class CniRoute:
    """A route for the pod; an empty ``gw`` means the gateway of the matching address."""

    dst: str
    gw: str


def _field(obj: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """``obj[key]`` checked to be a ``kind``; ``default`` when it is absent or null (required if None)."""
    value = obj.get(key)
    if value is None:
        if default is None:
            raise NetworkError(f"the CNI result has no {key!r} in {json.dumps(obj)}")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise NetworkError(f"the CNI result has a {key!r} that is not a {kind.__name__}: {json.dumps(obj)}")
    return value


def _objects(raw: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    items = raw.get(key) or []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise NetworkError(f"the CNI result's {key!r} is not a list of objects")
    return items


@dataclass(frozen=True)
class CniResult:
    """A plugin chain's result, in the shape of CNI 0.3.0 to 1.0.0 (0.1/0.2 results are converted)."""

    cni_version: str
    interfaces: list[CniInterface]
    ips: list[CniIP]
    routes: list[CniRoute]
    dns_nameservers: list[str]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, raw: Any) -> CniResult:
        """Parses a result as a plugin printed it.

        Raises:
            NetworkError: it is not a CNI result.
        """
        if not isinstance(raw, dict):
            raise NetworkError("the CNI result is not a JSON object")
        version = raw.get("cniVersion", "")
        if not isinstance(version, str):
            raise NetworkError("the CNI result's 'cniVersion' is not a string")
        interfaces: list[CniInterface] = []
        ips: list[CniIP] = []
        routes: list[CniRoute] = []
        if "ip4" in raw or "ip6" in raw:
            # CNI 0.1.0 and 0.2.0: one address per family, with its routes, and no interfaces.
            for family in ("ip4", "ip6"):
                block = raw.get(family)
                if block is None:
                    continue
                if not isinstance(block, dict):
                    raise NetworkError(f"the CNI result's {family!r} is not an object")
                ips.append(CniIP(_field(block, "ip", str), _field(block, "gateway", str, ""), None))
                routes += [CniRoute(_field(r, "dst", str), _field(r, "gw", str, "")) for r in _objects(block, "routes")]
        else:
            interfaces = [
                CniInterface(_field(i, "name", str), _field(i, "mac", str, ""), _field(i, "sandbox", str, ""))
                for i in _objects(raw, "interfaces")
            ]
            for ip in _objects(raw, "ips"):
                index = ip.get("interface")
                if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
                    raise NetworkError(f"the CNI result has an interface index that is not a number: {json.dumps(ip)}")
                ips.append(CniIP(_field(ip, "address", str), _field(ip, "gateway", str, ""), index))
            routes = [CniRoute(_field(r, "dst", str), _field(r, "gw", str, "")) for r in _objects(raw, "routes")]
        dns = raw.get("dns") or {}
        nameservers = (dns.get("nameservers") or []) if isinstance(dns, dict) else []
        if not isinstance(nameservers, list) or not all(isinstance(n, str) for n in nameservers):
            raise NetworkError("the CNI result's DNS nameservers are not a list of strings")
        return cls(version, interfaces, ips, routes, list(nameservers), raw)

    def pod_interface(self) -> CniInterface:
        """The interface inside the pod's namespace (the first with a sandbox).

        Raises:
            NetworkError: the result has no interface in a namespace.
        """
        for interface in self.interfaces:
            if interface.sandbox:
                return interface
        names = ", ".join(i.name for i in self.interfaces) or "none"
        raise NetworkError(f"the CNI result names no interface inside the pod's namespace (interfaces: {names})")

    def pod_ips(self) -> list[CniIP]:
        """The addresses on the pod interface: those whose index points at it, and those without an index."""
        index = next((n for n, i in enumerate(self.interfaces) if i.sandbox), None)
        return [ip for ip in self.ips if ip.interface is None or ip.interface == index]

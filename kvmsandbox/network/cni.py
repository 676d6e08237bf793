"""A small libcni: finds the node's CNI network config and runs its plugins as the CNI spec (1.0)
says, so a pod's namespace gets its interface, addresses, routes and port mappings.

A plugin is an executable named by the config's ``type``, looked up in the plugin directories. It
gets its config as JSON on stdin and the request in CNI_* environment variables, answers with a
result (or an error object) as JSON on stdout, and exits non-zero on failure. A config list runs
its plugins in order for ADD, each one seeing the previous one's result as ``prevResult``, and in
reverse for DEL, with the cached final ADD result as ``prevResult``.

ADD's inputs and final result are cached per network and container (as libcni does), because DEL
must repeat them: portmap, for one, only removes the rules for the port mappings it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsandbox.errors import InvalidArgument, NetworkError

log = logging.getLogger(__name__)

CONF_EXTENSIONS = (".conflist", ".conf", ".json")
CACHE_KIND = "kvmsandbox/cni-cache/v1"
# The spec's rules for container ids and network names.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# DEL is cleanup: each plugin gets at least this long (or the whole timeout, if shorter), even
# when the time for the whole chain is up.
_CLEANUP_FLOOR_SECONDS = 10.0


@dataclass(frozen=True)
class PortMapping:
    """A host port forwarded to a container port (the ``portMappings`` capability)."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        """The mapping as plugins take it in ``runtimeConfig.portMappings``."""
        entry: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol.lower(),
        }
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry

    @classmethod
    def from_cni(cls, entry: Mapping[str, Any]) -> PortMapping:
        return cls(
            host_port=int(entry["hostPort"]),
            container_port=int(entry["containerPort"]),
            protocol=str(entry.get("protocol", "tcp")),
            host_ip=str(entry.get("hostIP", "")),
        )


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


@dataclass(frozen=True)
class NetworkConfigList:
    """A CNI network: its name, version and plugin configs in chain order, and the file it came from."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: Path
    raw: dict[str, Any]


def load_network_config(conf_dirs: list[Path]) -> NetworkConfigList:
    """The node's pod network, chosen as containerd and CRI-O choose it: the lexically first
    *.conflist, *.conf or *.json file of the first directory that has one. A single-plugin config
    becomes a list of one.

    Raises:
        NetworkError: there is no config, or the chosen one is unreadable or malformed.
    """
    for directory in conf_dirs:
        try:
            files = sorted(
                (p for p in directory.iterdir() if p.name.endswith(CONF_EXTENSIONS) and not p.is_dir()),
                key=lambda p: p.name,
            )
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise NetworkError(f"cannot list the CNI config directory {directory}: {e.strerror or e}") from None
        if files:
            return _load_config_file(files[0])
    searched = ", ".join(str(d) for d in conf_dirs) or "(no directories configured)"
    raise NetworkError(f"there is no CNI network config (*.conflist, *.conf or *.json) in {searched}")


def _load_config_file(path: Path) -> NetworkConfigList:
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise NetworkError(f"cannot read the CNI network config {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NetworkError(f"the CNI network config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise NetworkError(f"the CNI network config {path} is not a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise NetworkError(f"the CNI network config {path} has no network name ('name')")
    if not _NETWORK_NAME.fullmatch(name):
        raise NetworkError(
            f"the CNI network config {path} has the network name {name!r}: a name starts with a letter or digit "
            "and has only letters, digits, '_', '.' and '-'"
        )
    version = data.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise NetworkError(f"the CNI network config {path} does not say its CNI version ('cniVersion')")
    # A .conf or .json holds one plugin's config, unless it is really a list (it has plugins, no type).
    if path.suffix == ".conflist" or ("plugins" in data and "type" not in data):
        plugins = data.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise NetworkError(f"the CNI network config list {path} has no plugins ('plugins')")
    else:
        plugins = [data]
    for n, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise NetworkError(f"plugin {n + 1} of the CNI network config {path} is not a JSON object")
        kind = plugin.get("type")
        if not isinstance(kind, str) or not kind:
            raise NetworkError(f"plugin {n + 1} of the CNI network config {path} does not say its type ('type')")
        ipam = plugin.get("ipam")
        if ipam is not None and (not isinstance(ipam, dict) or not isinstance(ipam.get("type", ""), str)):
            raise NetworkError(f"the {kind!r} plugin of the CNI network config {path} has a malformed 'ipam' section")
    return NetworkConfigList(name=name, cni_version=version, plugins=plugins, source=path, raw=data)


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0,)


def _check_container_id(container_id: str) -> None:
    if not _CONTAINER_ID.fullmatch(container_id):
        raise InvalidArgument(
            f"{container_id!r} is not a usable CNI container id: it must start with a letter or digit "
            "and have only letters, digits, '_', '.' and '-'"
        )


def _check_ifname(ifname: str) -> None:
    if not 0 < len(ifname.encode()) <= 15 or ifname in (".", "..") or any(c in ifname for c in "/: \t\n"):
        raise InvalidArgument(f"{ifname!r} is not a usable interface name (at most 15 bytes, no '/', ':' or spaces)")


def _cni_args(args: Mapping[str, str] | None) -> str:
    pairs = ["IgnoreUnknown=1"]
    for key, value in (args or {}).items():
        if key == "IgnoreUnknown":
            continue
        if not key or any(c in key + value for c in ";="):
            raise InvalidArgument(
                f"the CNI argument {key}={value!r} cannot be passed: keys and values hold no ';' or '='"
            )
        pairs.append(f"{key}={value}")
    return ";".join(pairs)


@dataclass(frozen=True)
class _Request:
    """Everything one ADD or DEL of one container passes to the plugins."""

    command: str
    container_id: str
    netns: str
    ifname: str
    cni_args: str
    capability_args: dict[str, Any]


class CniRunner:
    """Runs one network's plugin chain for containers, keeping ADD results for their DEL."""

    def __init__(self, config: NetworkConfigList, bin_dirs: list[Path], cache_dir: Path) -> None:
        self.config = config
        self.bin_dirs = list(bin_dirs)
        self.cache_dir = cache_dir

    # -- plugins --------------------------------------------------------------------------------

    def _find(self, kind: str) -> Path | None:
        if "/" in kind or kind in (".", ".."):
            return None
        for directory in self.bin_dirs:
            path = directory / kind
            if path.is_file() and os.access(path, os.X_OK):
                return path
        return None

    def _plugin_types(self) -> list[str]:
        kinds: list[str] = []
        for plugin in self.config.plugins:
            ipam = plugin.get("ipam")
            ipam_type = ipam.get("type") if isinstance(ipam, dict) else None
            for kind in (plugin["type"], ipam_type):
                if isinstance(kind, str) and kind and kind not in kinds:
                    kinds.append(kind)
        return kinds

    def check_plugins(self) -> None:
        """Checks that every plugin the network uses (IPAM plugins too) is an executable in the
        plugin directories.

        Raises:
            NetworkError: some are missing; the message names them and the directories searched.
        """
        missing = [kind for kind in self._plugin_types() if self._find(kind) is None]
        if missing:
            searched = ", ".join(str(d) for d in self.bin_dirs) or "(no plugin directories configured)"
            raise NetworkError(
                f"CNI network {self.config.name!r} ({self.config.source}) needs plugins that are not in "
                f"{searched}: {', '.join(missing)}"
            )

    def _plugin_conf(self, plugin: dict[str, Any], request: _Request, prev_result: Any) -> dict[str, Any]:
        """The config a plugin of the list gets: the list's name and version, the previous result,
        and runtimeConfig for the capabilities it declares."""
        conf = dict(plugin)
        conf["name"] = self.config.name
        conf["cniVersion"] = self.config.cni_version
        conf.pop("prevResult", None)
        if prev_result is not None:
            conf["prevResult"] = prev_result
        declared = plugin.get("capabilities")
        if isinstance(declared, dict):
            wanted = {
                cap: value
                for cap, value in request.capability_args.items()
                if declared.get(cap) is True and value not in (None, [], {})
            }
            if wanted:
                existing = conf.get("runtimeConfig")
                conf["runtimeConfig"] = {**(existing if isinstance(existing, dict) else {}), **wanted}
        return conf

    def _invoke(self, kind: str, conf: dict[str, Any], request: _Request, timeout: float) -> bytes:
        """Runs plugin ``kind`` once and returns its stdout.

        Raises:
            NetworkError: it is missing, could not start, timed out or reported an error.
        """
        doing = (
            f"add container {request.container_id} to"
            if request.command == "ADD"
            else f"remove container {request.container_id} from"
        )
        what = f"CNI plugin {kind!r} could not {doing} network {self.config.name!r}"
        path = self._find(kind)
        if path is None:
            searched = ", ".join(str(d) for d in self.bin_dirs) or "(no plugin directories configured)"
            raise NetworkError(f"{what}: there is no executable {kind!r} in {searched}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update(
            CNI_COMMAND=request.command,
            CNI_CONTAINERID=request.container_id,
            CNI_NETNS=request.netns,
            CNI_IFNAME=request.ifname,
            CNI_ARGS=request.cni_args,
            CNI_PATH=os.pathsep.join(str(d) for d in self.bin_dirs),
        )
        log.debug("CNI %s %s (network %s, container %s)", request.command, kind, self.config.name, request.container_id)
        try:
            # Its own process group, so a timeout also ends what it started (iptables, IPAM plugins).
            proc = subprocess.Popen(
                [str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            raise NetworkError(f"{what}: it could not be started: {e}") from None
        try:
            stdout, stderr = proc.communicate(json.dumps(conf).encode(), timeout=max(timeout, 0.001))
        except subprocess.TimeoutExpired:
            raise NetworkError(f"{what}: it did not finish within {timeout:.1f} s") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=5)
        if proc.returncode != 0:
            raise NetworkError(f"{what}: {_plugin_error(stdout, stderr, proc.returncode)}")
        return stdout

    # -- the cache ------------------------------------------------------------------------------

    def _cache_path(self, container_id: str) -> Path:
        return self.cache_dir / f"{self.config.name}-{container_id}.json"

    def _write_cache(self, container_id: str, entry: dict[str, Any]) -> None:
        path = self._cache_path(container_id)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(entry, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            raise NetworkError(f"cannot write the CNI cache file {path}: {e.strerror or e}") from None

    def _read_cache(self, container_id: str) -> dict[str, Any] | None:
        path = self._cache_path(container_id)
        try:
            entry = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("ignoring the unreadable CNI cache file %s: %s", path, e)
            return None
        if not isinstance(entry, dict) or entry.get("kind") != CACHE_KIND:
            log.warning("ignoring the CNI cache file %s: it is not one this runtime wrote", path)
            return None
        return entry

    def _remove_cache(self, container_id: str) -> None:
        path = self._cache_path(container_id)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise NetworkError(f"cannot remove the CNI cache file {path}: {e.strerror or e}") from None

    # -- ADD and DEL ----------------------------------------------------------------------------

    def add(
        self,
        container_id: str,
        netns: Path,
        ifname: str = "eth0",
        port_mappings: Sequence[PortMapping] = (),
        args: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> CniResult:
        """Runs ADD of every plugin of the list, in order, for a container in ``netns``, and
        returns the last plugin's result. ``timeout`` bounds the whole chain.

        If a plugin fails, DEL runs for it and the plugins before it (newest first), so nothing
        stays half made, and the error is raised. The inputs and the result are cached for DEL.

        Raises:
            InvalidArgument: the container id, interface name or CNI arguments are not usable.
            NetworkError: the namespace is missing, or a plugin failed (with the plugin's message).
        """
        _check_container_id(container_id)
        _check_ifname(ifname)
        if not netns.exists():
            raise NetworkError(f"cannot add container {container_id} to a network: its namespace {netns} is missing")
        mappings = [m.to_cni() for m in port_mappings if m.host_port > 0]
        request = _Request("ADD", container_id, str(netns), ifname, _cni_args(args), {"portMappings": mappings})
        entry: dict[str, Any] = {
            "kind": CACHE_KIND,
            "network": self.config.name,
            "containerId": container_id,
            "netns": str(netns),
            "ifname": ifname,
            "portMappings": mappings,
            "args": dict(args or {}),
            "result": None,
        }
        # Written before the first plugin runs, so a crash part-way still leaves what DEL needs.
        self._write_cache(container_id, entry)
        deadline = time.monotonic() + timeout
        prev: dict[str, Any] | None = None
        for n, plugin in enumerate(self.config.plugins):
            kind = plugin["type"]
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NetworkError(
                        f"adding container {container_id} to network {self.config.name!r} took longer than "
                        f"{timeout:g} s; CNI plugin {kind!r} did not get to run"
                    )
                stdout = self._invoke(kind, self._plugin_conf(plugin, request, prev), request, remaining)
                try:
                    result = json.loads(stdout)
                    CniResult.from_json(result)
                except (ValueError, NetworkError) as e:
                    raise NetworkError(
                        f"CNI plugin {kind!r} added container {container_id} to network {self.config.name!r} "
                        f"but printed no usable result: {e}"
                    ) from None
            except NetworkError as e:
                undo_errors = self._undo(n, request, prev, timeout)
                if undo_errors:
                    # Keep the cache: a later delete() can finish the job with it.
                    raise NetworkError(f"{e} (undoing it with DEL also failed: {'; '.join(undo_errors)})") from None
                self._remove_cache(container_id)
                raise
            prev = result
        final = CniResult.from_json(prev)
        entry["result"] = prev
        self._write_cache(container_id, entry)
        return final

    def _undo(self, failed: int, request: _Request, prev: dict[str, Any] | None, timeout: float) -> list[str]:
        """DEL for plugins ``failed``..0 after a failed ADD; returns the errors, the rest still run."""
        undo = dataclasses.replace(request, command="DEL")
        if _version(self.config.cni_version) < (0, 4, 0):
            prev = None
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        for plugin in reversed(self.config.plugins[: failed + 1]):
            remaining = max(deadline - time.monotonic(), min(timeout, _CLEANUP_FLOOR_SECONDS))
            try:
                self._invoke(plugin["type"], self._plugin_conf(plugin, undo, prev), undo, remaining)
            except NetworkError as e:
                log.warning("%s", e)
                errors.append(str(e))
        return errors

    def delete(self, container_id: str, netns: Path | None = None, ifname: str = "eth0", timeout: float = 60) -> None:
        """Runs DEL of every plugin of the list, last first, for a container; doing it again, or
        for a container that was never added, is harmless.

        What ADD cached (namespace, interface name, port mappings, CNI arguments, result) is used
        when there is a cache entry; ``netns`` overrides the cached namespace, and a namespace
        that no longer exists is passed as "" (plugins still release addresses then, but some
        can only clean up inside the namespace: bridge's ipMasq rules, for instance, so DEL
        before deleting the namespace). A plugin's failure is raised once all of them ran; the
        cache entry is removed only when all succeeded.

        Raises:
            InvalidArgument: the container id or interface name is not usable.
            NetworkError: a plugin failed (with the plugin's message) or the cache could not be removed.
        """
        _check_container_id(container_id)
        cached = self._read_cache(container_id) or {}
        ifname = str(cached.get("ifname") or ifname)
        _check_ifname(ifname)
        if netns is None and cached.get("netns"):
            netns = Path(str(cached["netns"]))
        ns = str(netns) if netns is not None and netns.exists() else ""
        try:
            mappings = [PortMapping.from_cni(m).to_cni() for m in cached.get("portMappings") or []]
            cni_args = _cni_args(cached.get("args") or {})
        except (KeyError, TypeError, ValueError, AttributeError, InvalidArgument) as e:
            log.warning("ignoring the inputs cached for container %s: %s", container_id, e)
            mappings, cni_args = [], _cni_args(None)
        request = _Request("DEL", container_id, ns, ifname, cni_args, {"portMappings": mappings})
        prev = cached.get("result")
        if not isinstance(prev, dict) or _version(self.config.cni_version) < (0, 4, 0):
            prev = None
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        for plugin in reversed(self.config.plugins):
            remaining = max(deadline - time.monotonic(), min(timeout, _CLEANUP_FLOOR_SECONDS))
            try:
                self._invoke(plugin["type"], self._plugin_conf(plugin, request, prev), request, remaining)
            except NetworkError as e:
                errors.append(str(e))
        if errors:
            raise NetworkError("; ".join(errors))
        self._remove_cache(container_id)

    def run_loopback(self, netns: Path) -> None:
        """Brings up ``lo`` in ``netns`` with the `loopback` plugin (as containerd does), if the
        plugin is installed; nothing to undo, it goes with the namespace.

        Raises:
            NetworkError: the plugin failed.
        """
        if self._find("loopback") is None:
            log.debug("no CNI loopback plugin in %s: leaving lo in %s as it is", self.bin_dirs, netns)
            return
        if not netns.exists():
            raise NetworkError(f"cannot bring up lo: the network namespace {netns} is missing")
        suffix = re.sub(r"[^A-Za-z0-9_.-]", "-", netns.name)
        request = _Request("ADD", f"loopback-{suffix}", str(netns), "lo", _cni_args(None), {})
        conf = {"cniVersion": self.config.cni_version, "name": "cni-loopback", "type": "loopback"}
        self._invoke("loopback", conf, request, 30)


def _plugin_error(stdout: bytes, stderr: bytes, returncode: int) -> str:
    """A plugin's failure in words: its error object's msg and details, else whatever it printed."""
    text = stdout.decode(errors="replace").strip()
    err_text = stderr.decode(errors="replace").strip()
    try:
        error = json.loads(text)
    except ValueError:
        error = None
    if isinstance(error, dict) and error.get("msg"):
        words = str(error["msg"])
        if error.get("details"):
            words += f": {error['details']}"
        if error.get("code") is not None:
            words += f" (CNI error code {error['code']})"
        return words
    return err_text or text or f"it exited with status {returncode} and printed nothing"

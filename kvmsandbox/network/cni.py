"""A small libcni: runs a CNI network's plugin chain as the CNI spec (1.0) says, so a pod's
namespace gets its interface, addresses, routes and port mappings. The network config is found
in ``cni_config``, one plugin runs in ``cni_plugin``, and results are read in ``cni_result``.

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
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsandbox.errors import InvalidArgument, NetworkError
from kvmsandbox.network.cni_config import NetworkConfigList
from kvmsandbox.network.cni_plugin import (
    PluginRequest,
    check_container_id,
    check_ifname,
    cni_args,
    find_plugin,
    run_plugin,
)
from kvmsandbox.network.cni_result import CniResult

log = logging.getLogger(__name__)

CACHE_KIND = "kvmsandbox/cni-cache/v1"
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


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0,)


class CniRunner:
    """Runs one network's plugin chain for containers, keeping ADD results for their DEL."""

    def __init__(self, config: NetworkConfigList, bin_dirs: list[Path], cache_dir: Path) -> None:
        self.config = config
        self.bin_dirs = list(bin_dirs)
        self.cache_dir = cache_dir

    # -- plugins --------------------------------------------------------------------------------

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
        missing = [kind for kind in self._plugin_types() if find_plugin(kind, self.bin_dirs) is None]
        if missing:
            searched = ", ".join(str(d) for d in self.bin_dirs) or "(no plugin directories configured)"
            raise NetworkError(
                f"CNI network {self.config.name!r} ({self.config.source}) needs plugins that are not in "
                f"{searched}: {', '.join(missing)}"
            )

    def _plugin_conf(self, plugin: dict[str, Any], request: PluginRequest, prev_result: Any) -> dict[str, Any]:
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

    def _invoke(self, kind: str, conf: dict[str, Any], request: PluginRequest, timeout: float) -> bytes:
        """Runs plugin ``kind`` once and returns its stdout.

        Raises:
            NetworkError: it is missing, could not start, timed out or reported an error.
        """
        return run_plugin(kind, conf, request, self.config.name, self.bin_dirs, timeout)

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
        check_container_id(container_id)
        check_ifname(ifname)
        if not netns.exists():
            raise NetworkError(f"cannot add container {container_id} to a network: its namespace {netns} is missing")
        mappings = [m.to_cni() for m in port_mappings if m.host_port > 0]
        request = PluginRequest("ADD", container_id, str(netns), ifname, cni_args(args), {"portMappings": mappings})
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
            try:
                prev = self._add_one(plugin, request, prev, deadline, timeout)
            except NetworkError as e:
                undo_errors = self._undo(n, request, prev, timeout)
                if undo_errors:
                    # Keep the cache: a later delete() can finish the job with it.
                    raise NetworkError(f"{e} (undoing it with DEL also failed: {'; '.join(undo_errors)})") from None
                self._remove_cache(container_id)
                raise
        final = CniResult.from_json(prev)
        entry["result"] = prev
        self._write_cache(container_id, entry)
        return final

    def _add_one(
        self,
        plugin: dict[str, Any],
        request: PluginRequest,
        prev: dict[str, Any] | None,
        deadline: float,
        timeout: float,
    ) -> Any:
        """Runs ADD of one plugin of the list, in the time left before ``deadline`` of the chain's
        ``timeout``, and returns its result as parsed JSON.

        Raises:
            NetworkError: no time was left, the plugin failed, or it printed no usable result.
        """
        kind = plugin["type"]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NetworkError(
                f"adding container {request.container_id} to network {self.config.name!r} took longer than "
                f"{timeout:g} s; CNI plugin {kind!r} did not get to run"
            )
        stdout = self._invoke(kind, self._plugin_conf(plugin, request, prev), request, remaining)
        try:
            result = json.loads(stdout)
            CniResult.from_json(result)
        except (ValueError, NetworkError) as e:
            raise NetworkError(
                f"CNI plugin {kind!r} added container {request.container_id} to network {self.config.name!r} "
                f"but printed no usable result: {e}"
            ) from None
        return result

    def _undo(self, failed: int, request: PluginRequest, prev: dict[str, Any] | None, timeout: float) -> list[str]:
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
        check_container_id(container_id)
        cached = self._read_cache(container_id) or {}
        ifname = str(cached.get("ifname") or ifname)
        check_ifname(ifname)
        if netns is None and cached.get("netns"):
            netns = Path(str(cached["netns"]))
        ns = str(netns) if netns is not None and netns.exists() else ""
        try:
            mappings = [PortMapping.from_cni(m).to_cni() for m in cached.get("portMappings") or []]
            args = cni_args(cached.get("args") or {})
        except (KeyError, TypeError, ValueError, AttributeError, InvalidArgument) as e:
            log.warning("ignoring the inputs cached for container %s: %s", container_id, e)
            mappings, args = [], cni_args(None)
        request = PluginRequest("DEL", container_id, ns, ifname, args, {"portMappings": mappings})
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
        if find_plugin("loopback", self.bin_dirs) is None:
            log.debug("no CNI loopback plugin in %s: leaving lo in %s as it is", self.bin_dirs, netns)
            return
        if not netns.exists():
            raise NetworkError(f"cannot bring up lo: the network namespace {netns} is missing")
        suffix = re.sub(r"[^A-Za-z0-9_.-]", "-", netns.name)
        request = PluginRequest("ADD", f"loopback-{suffix}", str(netns), "lo", cni_args(None), {})
        conf = {"cniVersion": self.config.cni_version, "name": "cni-loopback", "type": "loopback"}
        self._invoke("loopback", conf, request, 30)

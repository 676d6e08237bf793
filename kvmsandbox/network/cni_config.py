"""Finds the node's CNI network config and checks it, as containerd and CRI-O choose and read it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmsandbox.errors import NetworkError

CONF_EXTENSIONS = (".conflist", ".conf", ".json")
# The spec's rule for network names.
_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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

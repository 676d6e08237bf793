"""Checks what the host sends before crun sees it: container and exec ids, OCI runtime specs and
OCI process objects, so a mistake fails with a clear message instead of deep inside crun."""

from __future__ import annotations

import json
import os
import re
from typing import Any, cast

from kvmsandbox.agent.guest.errors import InvalidArgument

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_id(kind: str, value: str) -> str:
    """Returns ``value`` if it is a usable container or exec id.

    Raises:
        InvalidArgument: it is empty or has characters crun or a path would not accept.
    """
    if not ID_PATTERN.match(value):
        raise InvalidArgument(f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '.', '-'")
    return value


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise InvalidArgument(f"invalid OCI runtime spec: {message}")


def validate_process(process: Any, where: str) -> dict[str, Any]:
    """Checks the parts of an OCI ``process`` object that would otherwise fail deep inside crun.

    Raises:
        InvalidArgument: a required field is missing or has the wrong type.
    """
    _require(isinstance(process, dict), f"{where} must be an object")
    args = process.get("args")
    _require(
        isinstance(args, list) and bool(args) and all(isinstance(a, str) for a in args),
        f"{where}.args must be a non-empty list of strings",
    )
    cwd = process.get("cwd", "/")
    _require(isinstance(cwd, str) and cwd.startswith("/"), f"{where}.cwd must be an absolute path")
    env = process.get("env", [])
    _require(
        isinstance(env, list) and all(isinstance(e, str) and "=" in e for e in env),
        f"{where}.env must be a list of NAME=value strings",
    )
    _require(isinstance(process.get("terminal", False), bool), f"{where}.terminal must be a boolean")
    size = process.get("consoleSize", {})
    _require(
        isinstance(size, dict)
        and all(isinstance(size.get(k, 0), int) and 0 <= size.get(k, 0) < 1 << 16 for k in ("height", "width")),
        f"{where}.consoleSize must hold a height and a width below 65536",
    )
    user = process.get("user", {})
    _require(isinstance(user, dict), f"{where}.user must be an object")
    for key in ("uid", "gid"):
        value = user.get(key, 0)
        _require(isinstance(value, int) and value >= 0, f"{where}.user.{key} must be a non-negative integer")
    return cast(dict[str, Any], process)


def validate_spec(spec_json: str, root_made_here: bool = False) -> dict[str, Any]:
    """Parses and checks an OCI runtime spec sent by the host (``root_made_here``: the agent
    assembles the root later, so it need not exist yet).

    Raises:
        InvalidArgument: not JSON, or a required field is missing or malformed.
    """
    try:
        spec = json.loads(spec_json)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"invalid OCI runtime spec: not JSON ({e})") from None
    _require(isinstance(spec, dict), "the spec must be a JSON object")
    _require(isinstance(spec.get("ociVersion"), str), "ociVersion (a string) is required")
    validate_process(spec.get("process"), "process")
    root = spec.get("root")
    _require(isinstance(root, dict) and isinstance(root.get("path"), str), "root.path (a string) is required")
    _require(root["path"].startswith("/"), "root.path must be an absolute guest path")
    _require(root_made_here or os.path.isdir(root["path"]), f"root.path {root['path']} is not a directory in the guest")
    mounts = spec.get("mounts", [])
    _require(isinstance(mounts, list), "mounts must be a list")
    for i, m in enumerate(mounts):
        _require(
            isinstance(m, dict) and str(m.get("destination", "")).startswith("/"),
            f"mounts[{i}].destination must be an absolute path",
        )
    return cast(dict[str, Any], spec)

"""Workload files for the scheduling simulation: a YAML list of pods with their requests, limits and
real usage, read into one PodSpec per pod (see ``examples/overhead/pods.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.overhead.quantity import parse_cpu, parse_memory

# A node holds 110 pods by default; far more in one file is a typo (count: 100000), not a workload.
MAX_PODS = 10_000

_POD_KEYS = ("name", "count", "requests", "limits", "usage")
_RESOURCE_KEYS = {"requests": ("memory", "cpu"), "limits": ("memory", "cpu"), "usage": ("memory",)}


@dataclass(frozen=True)
class PodSpec:
    """One pod of the workload: memory in bytes, CPU in millicores."""

    name: str
    requests_memory: int
    requests_cpu: int
    # Set when the pod's memory is bounded: the kubelet then limits the pod cgroup to this plus podFixed.
    limits_memory: int | None
    # What the containers really use.
    usage_memory: int


def _resources(entry: dict[str, Any], key: str, where: str) -> dict[str, int]:
    """The entry's ``requests``/``limits``/``usage`` mapping, parsed; {} when the key is absent."""
    raw = entry.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: {key} must be a mapping such as {{memory: 256Mi, cpu: 100m}}")
    allowed = _RESOURCE_KEYS[key]
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key {key}.{unknown[0]} (allowed in {key}: {', '.join(allowed)})")
    parsed: dict[str, int] = {}
    for resource, value in raw.items():
        what = f"{where}: {key}.{resource}"
        parsed[resource] = parse_memory(value, what=what) if resource == "memory" else parse_cpu(value, what=what)
    return parsed


def _pod_entry(entry: Any, index: int, source: str) -> tuple[str, int, PodSpec]:
    """One entry of ``pods:`` as (name, count, the spec every copy shares)."""
    where = f"{source}: pods entry {index}"
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where} must be a mapping with name, count, requests, limits and usage")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(f"{where} has no name (every entry needs `name:`)")
    where = f"{where} ({name})"
    unknown = sorted(str(k) for k in entry if k not in _POD_KEYS)
    if unknown:
        raise InvalidArgument(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(_POD_KEYS)})")
    count = entry.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgument(f"{where}: count must be a whole number of 1 or more, not {count!r}")
    if "requests" not in entry:
        raise InvalidArgument(f"{where} has no requests (the scheduler packs pods by requests.memory and requests.cpu)")
    requests = _resources(entry, "requests", where)
    limits = _resources(entry, "limits", where)
    usage = _resources(entry, "usage", where)
    if "memory" not in requests:
        raise InvalidArgument(f"{where} has no requests.memory (the scheduler packs pods by it)")
    limit = limits.get("memory")
    if limit is not None and requests["memory"] > limit:
        raise InvalidArgument(f"{where}: requests.memory is above limits.memory, which Kubernetes refuses")
    if "cpu" in limits and requests.get("cpu", 0) > limits["cpu"]:
        raise InvalidArgument(f"{where}: requests.cpu is above limits.cpu, which Kubernetes refuses")
    used = usage.get("memory", limit if limit is not None else requests["memory"])
    if limit is not None and used > limit:
        raise InvalidArgument(
            f"{where}: usage.memory is above limits.memory; the container's own limit would stop it first"
        )
    spec = PodSpec(name, requests["memory"], requests.get("cpu", 0), limit, used)
    return name, count, spec


def parse_workload(data: Any, source: str) -> list[PodSpec]:
    """The pods of a workload document, counts expanded in file order (``web-1``, ``web-2``, ...)."""
    if not isinstance(data, dict) or "pods" not in data:
        raise InvalidArgument(f"{source}: a workload file is a mapping with a `pods:` list")
    unknown = sorted(str(k) for k in data if k != "pods")
    if unknown:
        raise InvalidArgument(f"{source}: unknown top-level key {unknown[0]!r} (only `pods:` is read)")
    entries = data["pods"]
    if not isinstance(entries, list) or not entries:
        raise InvalidArgument(f"{source}: `pods:` must be a non-empty list")
    pods: list[PodSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        name, count, spec = _pod_entry(entry, index, source)
        if name in seen:
            raise InvalidArgument(f"{source}: pods entry {index}: the name {name!r} is used by an earlier entry")
        seen.add(name)
        if len(pods) + count > MAX_PODS:
            raise InvalidArgument(f"{source}: pods entry {index} ({name}): more than {MAX_PODS} pods in all")
        pods.extend(
            PodSpec(f"{name}-{n}", spec.requests_memory, spec.requests_cpu, spec.limits_memory, spec.usage_memory)
            for n in range(1, count + 1)
        )
    return pods


def load_workload(path: Path) -> list[PodSpec]:
    """Read a workload YAML file (see ``examples/overhead/pods.yaml``)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidArgument(f"cannot read the workload file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path} is not YAML: {e}") from None
    return parse_workload(data, str(path))

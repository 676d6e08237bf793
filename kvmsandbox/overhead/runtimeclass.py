"""The RuntimeClass that tells Kubernetes what a kvmsandbox pod costs beyond its containers.

``overhead.podFixed`` is added to every pod of the class: the scheduler counts it against the node
and the kubelet adds it to the pod's cgroup limit, which is where the VMM runs. The figures come
from the node's measurement (see ``model.Measurement.recommended_*``).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import yaml

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.overhead.quantity import format_cpu, format_memory

API_VERSION = "node.k8s.io/v1"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SOURCE_ANNOTATION = "kvmsandbox.io/overhead-source"

# RFC 1123 names as Kubernetes validates them (k8s.io/apimachinery/pkg/util/validation).
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# A label key's name part and a label value.
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_NAME_MAX = 63
_SUBDOMAIN_MAX = 253


def _check_label(field: str, value: str) -> None:
    if len(value) > _LABEL_NAME_MAX or not _DNS1123_LABEL.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} is not a valid RuntimeClass handler: Kubernetes wants a DNS-1123 label "
            f"(lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters)"
        )


def _check_subdomain(field: str, value: str) -> None:
    if len(value) > _SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} is not a valid RuntimeClass name: Kubernetes wants a DNS-1123 subdomain "
            f"(lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit, "
            f"at most 253 characters)"
        )


def _check_node_selector(node_selector: dict[str, str]) -> None:
    """Label keys ([prefix/]name) and values as Kubernetes accepts them, so a typo in the config is caught here."""
    for key, value in node_selector.items():
        prefix, _, name = key.rpartition("/")
        if (
            (prefix and (len(prefix) > _SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.fullmatch(prefix)))
            or len(name) > _LABEL_NAME_MAX
            or not _QUALIFIED_NAME.fullmatch(name)
        ):
            raise InvalidArgument(
                f"node selector key {key!r} is not a Kubernetes label key "
                f"(an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.')"
            )
        if not isinstance(value, str) or (
            value and (len(value) > _LABEL_NAME_MAX or not _QUALIFIED_NAME.fullmatch(value))
        ):
            raise InvalidArgument(
                f"node selector value {value!r} for {key!r} is not a Kubernetes label value "
                f"(a string of at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
            )


def runtime_class(
    handler: str,
    memory_bytes: int,
    cpu_millicores: int,
    node_selector: dict[str, str],
    name: str | None = None,
    source: str = "",
) -> dict[str, Any]:
    """A ``node.k8s.io/v1`` RuntimeClass with ``overhead.podFixed`` set to the given figures.

    ``name`` defaults to the handler; ``source`` (say, when and how the figures were measured) goes
    into an annotation so whoever finds the object in a cluster knows where the numbers came from.
    """
    _check_label("handler", handler)
    name = handler if name is None else name
    _check_subdomain("name", name)
    if memory_bytes < 0 or cpu_millicores < 0:
        raise InvalidArgument(
            f"pod overhead cannot be negative (memory {memory_bytes} bytes, CPU {cpu_millicores} millicores)"
        )
    _check_node_selector(node_selector)
    metadata: dict[str, Any] = {"name": name, "labels": {MANAGED_BY_LABEL: "kvmsandbox"}}
    if source:
        metadata["annotations"] = {SOURCE_ANNOTATION: source}
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "RuntimeClass",
        "metadata": metadata,
        "handler": handler,
        "overhead": {"podFixed": {"memory": format_memory(memory_bytes), "cpu": format_cpu(cpu_millicores)}},
    }
    if node_selector:
        obj["scheduling"] = {"nodeSelector": dict(node_selector)}
    return obj


def runtime_class_yaml(
    handler: str,
    memory_bytes: int,
    cpu_millicores: int,
    node_selector: dict[str, str],
    name: str | None = None,
    source: str = "",
    comment: str = "",
) -> str:
    """``runtime_class(...)`` as a YAML document for ``kubectl apply -f``, under ``comment`` as ``# `` lines."""
    obj = runtime_class(handler, memory_bytes, cpu_millicores, node_selector, name=name, source=source)
    lines: list[str] = []
    for paragraph in comment.splitlines():
        wrapped = textwrap.wrap(paragraph, width=98, break_long_words=False, break_on_hyphens=False)
        lines.extend(f"# {line}" for line in wrapped or [""])
    header = "".join(line.rstrip() + "\n" for line in lines)
    return header + yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)

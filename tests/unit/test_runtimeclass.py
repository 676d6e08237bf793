"""The RuntimeClass we print validates against Kubernetes' own schema, and bad names are refused."""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.overhead.quantity import parse_cpu, parse_memory
from kvmsandbox.overhead.runtimeclass import runtime_class, runtime_class_yaml

MI = 1024**2
KUBERNETES_VERSION = "1.37"
SELECTOR = {"kvmsandbox.io/runtime": "true"}
# The pattern Kubernetes' generated schemas give resource.Quantity (the OpenAPI schema
# kubernetes-validate ships only says "string or number", so "lots" would pass it).
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def validate(obj: dict[str, Any]) -> None:
    """Raises kubernetes_validate.ValidationError; strict, so unknown fields fail too."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def sample_yaml() -> str:
    return runtime_class_yaml(
        "kvmsandbox",
        221 * MI,
        40,
        SELECTOR,
        source="measured 2026-01-01T00:00:00Z, 3 samples, accel kvm",
        comment="Pod overhead measured by kvmsandbox: highest observed 200.0 MiB and 30.0m, plus a 10% margin.\n"
        "Second paragraph.",
    )


def test_yaml_validates_against_the_kubernetes_schema() -> None:
    obj = yaml.safe_load(sample_yaml())
    validate(obj)
    assert obj == {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {
            "name": "kvmsandbox",
            "labels": {"app.kubernetes.io/managed-by": "kvmsandbox"},
            "annotations": {"kvmsandbox.io/overhead-source": "measured 2026-01-01T00:00:00Z, 3 samples, accel kvm"},
        },
        "handler": "kvmsandbox",
        "overhead": {"podFixed": {"memory": "221Mi", "cpu": "40m"}},
        "scheduling": {"nodeSelector": {"kvmsandbox.io/runtime": "true"}},
    }


def test_quantities_are_kubernetes_quantities_that_read_back() -> None:
    for memory, cpu in [(221 * MI, 40), (2 * 1024 * MI, 2000), (123456789, 1), (0, 0)]:
        pod_fixed = runtime_class("kvmsandbox", memory, cpu, {})["overhead"]["podFixed"]
        assert QUANTITY.match(pod_fixed["memory"]) and QUANTITY.match(pod_fixed["cpu"])
        assert parse_memory(pod_fixed["memory"]) == memory
        assert parse_cpu(pod_fixed["cpu"]) == cpu


def test_whole_cores_stay_a_string_in_yaml() -> None:
    obj = yaml.safe_load(runtime_class_yaml("kvmsandbox", 256 * MI, 2000, {}))
    assert obj["overhead"]["podFixed"]["cpu"] == "2"
    validate(obj)


def test_comment_lines_come_first() -> None:
    text = sample_yaml()
    lines = text.splitlines()
    comments = [line for line in lines if line.startswith("#")]
    assert lines[: len(comments)] == comments
    assert [line for line in comments if not line.startswith("# ") and line != "#"] == []
    assert all(len(line) <= 100 for line in comments)
    assert "# Second paragraph." in comments
    assert lines[len(comments)] == "apiVersion: node.k8s.io/v1"


def test_optional_parts_are_omitted() -> None:
    text = runtime_class_yaml("kvmsandbox", 160 * MI, 250, {})
    assert not text.startswith("#")
    obj = yaml.safe_load(text)
    assert "scheduling" not in obj
    assert "annotations" not in obj["metadata"]
    validate(obj)


def test_name_defaults_to_the_handler_and_can_differ() -> None:
    assert runtime_class("kvm", 1, 1, {})["metadata"]["name"] == "kvm"
    obj = runtime_class("kvm", 1, 1, {}, name="kvmsandbox.example.com")
    assert obj["metadata"]["name"] == "kvmsandbox.example.com"
    validate(obj)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda o: o["overhead"].update(podfixed={"memory": "1Gi"}),  # a typo'd field: strict mode refuses it
        lambda o: o["overhead"]["podFixed"].update(memory=["1Gi"]),  # not a quantity at all
        lambda o: o["scheduling"]["nodeSelector"].update(zone=1),  # label values are strings
        lambda o: o.update(handler=["kvmsandbox"]),
        lambda o: o.update(spec={}),
    ],
)
def test_schema_catches_broken_objects(breakage: Any) -> None:
    """The same validation fails on a broken object, so the test above can fail."""
    obj = copy.deepcopy(yaml.safe_load(sample_yaml()))
    breakage(obj)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(obj)


@pytest.mark.parametrize(
    "handler",
    ["KVM", "kvm_sandbox", "-kvm", "kvm-", "kvm.sandbox", "", "a" * 64, "kvm sandbox", "kvmé"],
)
def test_handler_must_be_a_dns_label(handler: str) -> None:
    with pytest.raises(InvalidArgument, match=r"handler .* DNS-1123 label"):
        runtime_class(handler, 1, 1, {})


def test_longest_handler_is_fine() -> None:
    runtime_class("a" * 63, 1, 1, {})


@pytest.mark.parametrize("name", ["Kvm", "kvm..x", ".kvm", "kvm.", "kvm_x", "a" * 254, "x." + "-a"])
def test_name_must_be_a_dns_subdomain(name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"name .* DNS-1123 subdomain"):
        runtime_class("kvm", 1, 1, {}, name=name)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"Bad_Prefix.io/x": "true"}, "label key"),
        ({"kvmsandbox.io/": "true"}, "label key"),
        ({"-x": "true"}, "label key"),
        ({"x": "not ok"}, "label value"),
        ({"x": "a" * 64}, "label value"),
    ],
)
def test_node_selector_must_be_labels(selector: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        runtime_class("kvm", 1, 1, selector)


def test_empty_label_value_is_fine() -> None:
    validate(runtime_class("kvm", 1, 1, {"kvmsandbox.io/runtime": ""}))


def test_negative_overhead_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        runtime_class("kvm", -1, 1, {})

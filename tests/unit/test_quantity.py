"""Kubernetes quantities: parsing what people and YAML write, formatting what the API server prints."""

from __future__ import annotations

import pytest

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.overhead.quantity import format_cpu, format_memory, parse_cpu, parse_memory

KI, MI, GI = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24Gi", 24 * GI),
        ("160Mi", 160 * MI),
        ("512Ki", 512 * KI),
        ("1Ti", 1024 * GI),
        ("1G", 10**9),
        ("100M", 100 * 10**6),
        ("1k", 1000),
        ("1.5Gi", 3 * GI // 2),
        (".5Gi", GI // 2),
        ("123", 123),
        ("1e3", 1000),
        ("1E3", 1000),  # an exponent, not exa and a 3
        ("1E", 10**18),  # exa
        ("+1Ki", 1024),
        ("0", 0),
        ("0.1Ki", 103),  # 102.4 bytes, rounded up as Kubernetes does
        ("1.000001", 2),
        (" 2Gi ", 2 * GI),
        (1024, 1024),  # YAML `memory: 1024` is bytes
        (1.5, 2),
        (0, 0),
    ],
)
def test_parse_memory(text: str | int | float, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2", 2000),
        ("250m", 250),
        ("0.5", 500),
        ("1.25", 1250),
        ("1e-3", 1),
        ("0.0001", 1),  # a tenth of a millicore rounds up to one
        ("100.5m", 101),
        (2, 2000),  # YAML `cpu: 2` is cores
        (0.1, 100),  # the YAML float 0.1, not 0.1000000000000000055...
        (0.25, 250),
        (0, 0),
    ],
)
def test_parse_cpu(text: str | int | float, expected: int) -> None:
    assert parse_cpu(text) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", "not a Kubernetes memory quantity"),
        ("1GB", "not a Kubernetes memory quantity"),
        ("1gi", "not a Kubernetes memory quantity"),
        ("1 Gi", "not a Kubernetes memory quantity"),
        ("", "not a Kubernetes memory quantity"),
        ("Gi", "not a Kubernetes memory quantity"),
        ("1..5Gi", "not a Kubernetes memory quantity"),
        ("-1Gi", "negative"),
        (-5, "negative"),
        ("500m", "write Mi for mebibytes"),
        ("1e99", "too large"),
        ("8Ei", "too large"),
        (True, "not a Kubernetes memory quantity"),
        (float("nan"), "not a Kubernetes memory quantity"),
        (float("inf"), "not a Kubernetes memory quantity"),
    ],
)
def test_parse_memory_errors(value: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_memory(value)  # type: ignore[arg-type]  # the wrong types are the point


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("two", "not a Kubernetes CPU quantity"),
        ("2Gi", "not a CPU quantity"),
        ("1k", "not a CPU quantity"),
        ("-1", "negative"),
        ("-250m", "negative"),
        ("1e30", "too large"),
        (False, "not a Kubernetes CPU quantity"),
    ],
)
def test_parse_cpu_errors(value: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_cpu(value)  # type: ignore[arg-type]


def test_errors_name_the_field() -> None:
    with pytest.raises(InvalidArgument, match=r"^--node-memory: '24GB' is not"):
        parse_memory("24GB", what="--node-memory")
    with pytest.raises(InvalidArgument, match=r"^requests\.cpu: "):
        parse_cpu("x", what="requests.cpu")


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [
        (160 * MI, "160Mi"),
        (2 * GI, "2Gi"),
        (1536 * MI, "1536Mi"),
        (512 * KI, "512Ki"),
        (1536, "1536"),  # 1.5Ki is not whole
        (1000, "1000"),
        (2048, "2Ki"),
        (1024 * GI, "1Ti"),
        (0, "0"),
    ],
)
def test_format_memory(num_bytes: int, expected: str) -> None:
    assert format_memory(num_bytes) == expected
    assert parse_memory(expected) == num_bytes


@pytest.mark.parametrize(("millicores", "expected"), [(250, "250m"), (2000, "2"), (1500, "1500m"), (0, "0")])
def test_format_cpu(millicores: int, expected: str) -> None:
    assert format_cpu(millicores) == expected
    assert parse_cpu(expected) == millicores


def test_format_refuses_negatives() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        format_memory(-1)
    with pytest.raises(InvalidArgument, match="negative"):
        format_cpu(-1)

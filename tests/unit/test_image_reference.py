import pytest

from kvmsandbox.errors import InvalidArgument
from kvmsandbox.image import Reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("busybox", Reference("docker.io", "library/busybox", "latest")),
        ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36")),
        ("library/busybox", Reference("docker.io", "library/busybox", "latest")),
        ("docker.io/busybox", Reference("docker.io", "library/busybox", "latest")),
        ("index.docker.io/library/busybox", Reference("docker.io", "library/busybox", "latest")),
        ("bitnami/nginx:1", Reference("docker.io", "bitnami/nginx", "1")),
        ("registry.k8s.io/pause:3.10", Reference("registry.k8s.io", "pause", "3.10")),
        ("localhost/app", Reference("localhost", "app", "latest")),
        ("localhost:5000/a/b/c:v1", Reference("localhost:5000", "a/b/c", "v1")),
        ("127.0.0.1:5000/busybox:1", Reference("127.0.0.1:5000", "busybox", "1")),
        ("[::1]:5000/busybox", Reference("[::1]:5000", "busybox", "latest")),
        ("Example.COM/app", Reference("Example.COM", "app", "latest")),
        ("ghcr.io/a-b/c_d.e__f:T_a.g-1", Reference("ghcr.io", "a-b/c_d.e__f", "T_a.g-1")),
        (f"busybox@{DIGEST}", Reference("docker.io", "library/busybox", None, DIGEST)),
        (f"quay.io/a/b:1.0@{DIGEST}", Reference("quay.io", "a/b", None, DIGEST)),
        ("localhost:5000", Reference("docker.io", "library/localhost", "5000")),
    ],
)
def test_references_are_normalised_like_docker_does(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


def test_a_reference_prints_in_its_canonical_form() -> None:
    assert str(parse_reference("busybox")) == "docker.io/library/busybox:latest"
    assert str(parse_reference(f"a.io/b:1@{DIGEST}")) == f"a.io/b@{DIGEST}"
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("a.io:5000/b").api_host == "a.io:5000"
    assert parse_reference(f"b@{DIGEST}").object == DIGEST
    assert parse_reference("b:7").object == "7"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        (" busybox", "surrounding spaces"),
        ("Busybox", "repository 'Busybox'"),
        ("UPPER/Case::x", "repository"),
        ("busybox:", "not a valid tag"),
        ("busybox:-1", "not a valid tag"),
        ("busybox:" + "t" * 129, "not a valid tag"),
        ("a//b", "repository"),
        ("a/b/", "repository"),
        ("a/-b", "repository"),
        ("a/b_-c", "repository"),
        ("busybox@sha256:abc", "64 lowercase hex"),
        ("busybox@md5:" + "a" * 32, "digest must be sha256"),
        (f"busybox@{DIGEST.upper()}", "digest"),
        ("-bad.io/x", "registry host"),
        ("reg.io:port/x", "registry host"),
        ("a.io/" + "x" * 260, "longer than 255"),
    ],
)
def test_malformed_references_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid image reference") as e:
        parse_reference(text)
    assert words in str(e.value)

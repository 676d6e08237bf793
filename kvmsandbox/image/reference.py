"""Image references, normalised the way docker and containerd do (``busybox`` is
``docker.io/library/busybox:latest``), following the grammar of distribution's ``reference`` package."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmsandbox.errors import InvalidArgument

DOCKER_HUB = "docker.io"
# Where docker.io's registry API really answers.
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``registry`` is a host[:port] (``docker.io`` for Docker Hub),
    ``repository`` its path (``library/busybox``); exactly one of ``tag`` and ``digest`` is set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``, what tags and digests are recorded under."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def object(self) -> str:
        """What to ask the manifests endpoint for: the digest if there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    # Docker's rule: the first component is a registry host only if it looks like one.
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        return first, rest
    return DOCKER_HUB, name


def parse_reference(text: str) -> Reference:
    """Parses and normalises an image reference.

    ``busybox`` -> ``docker.io/library/busybox:latest``; ``host:5000/a/b:tag``; ``name@sha256:...``.
    A reference with both a tag and a digest keeps only the digest, as containerd's CRI does.

    Raises:
        InvalidArgument: the reference does not follow the grammar; the message says why.
    """
    if not text or text != text.strip():
        raise InvalidArgument(f"invalid image reference {text!r}: it is empty or has surrounding spaces")
    remainder, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise InvalidArgument(
            f"invalid image reference {text!r}: the digest must be sha256: and 64 lowercase hex digits"
        )
    name, tag = remainder, ""
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        name, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"invalid image reference {text!r}: {tag!r} is not a valid tag")
    registry, path = _split_domain(name)
    if not _DOMAIN.fullmatch(registry):
        raise InvalidArgument(f"invalid image reference {text!r}: {registry!r} is not a valid registry host")
    if not path or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
        raise InvalidArgument(
            f"invalid image reference {text!r}: the repository {path!r} must be lowercase letters, digits "
            "and separators (. _ __ -) in /-separated components"
        )
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(f"{registry}/{path}") > _MAX_NAME:
        raise InvalidArgument(f"invalid image reference {text!r}: the name is longer than {_MAX_NAME} characters")
    if digest:
        return Reference(registry, path, None, digest)
    return Reference(registry, path, tag or DEFAULT_TAG, None)

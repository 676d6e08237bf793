"""The runtime's error hierarchy, in one place.

Each class names the gRPC status code it maps to at the CRI edge, so the servicers translate
errors without knowing where they came from.
"""

from __future__ import annotations


class KvmSandboxError(Exception):
    """Base of every error the runtime raises on purpose."""

    grpc_code = "INTERNAL"


class InvalidArgument(KvmSandboxError):
    """The request itself is wrong (malformed id, spec, reference)."""

    grpc_code = "INVALID_ARGUMENT"


class NotFound(KvmSandboxError):
    """The named sandbox, container, process or image does not exist."""

    grpc_code = "NOT_FOUND"


class AlreadyExists(KvmSandboxError):
    """An object with that id or name exists already."""

    grpc_code = "ALREADY_EXISTS"


class FailedPrecondition(KvmSandboxError):
    """The object is in a state that does not allow the request."""

    grpc_code = "FAILED_PRECONDITION"


class DeadlineExceeded(KvmSandboxError):
    """Something did not answer in the time it was given."""

    grpc_code = "DEADLINE_EXCEEDED"


class Unavailable(KvmSandboxError):
    """A component the request needs is not reachable right now."""

    grpc_code = "UNAVAILABLE"


class AgentMisbehaved(Unavailable):
    """The agent broke the protocol (a frame or message that does not decode, an unknown code, an
    answer nobody asked for): it is no longer trusted, and its sandbox is BROKEN."""


class ResourceExhausted(KvmSandboxError):
    """A per-sandbox or per-node bound was reached (the message names it)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class Unimplemented(KvmSandboxError):
    """A request asks for something this runtime does not do yet (the message says what)."""

    grpc_code = "UNIMPLEMENTED"


class HypervisorError(KvmSandboxError):
    """Booting, inspecting or destroying a VM failed; the message carries the VMM's words."""


class NetworkError(KvmSandboxError):
    """A pod network could not be set up or torn down (namespace, CNI config or plugin); the
    message carries the plugin's own words."""


class GuestImageError(KvmSandboxError):
    """The guest image could not be built or is incomplete."""


class RegistryAuthError(KvmSandboxError):
    """The registry or its token server refused the credentials, or asked for some and none were given."""

    grpc_code = "UNAUTHENTICATED"


class ContentError(KvmSandboxError):
    """A registry sent content that fails verification (digest, size) or cannot be used."""


class LimitExceeded(ContentError):
    """Content is larger than a configured limit allows (the message names the limit)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class AgentError(KvmSandboxError):
    """The in-guest agent answered with an error; ``grpc_code`` is the agent's own code."""

    def __init__(self, message: str, grpc_code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.grpc_code = grpc_code


class IllegalTransition(KvmSandboxError):
    """A sandbox or container was asked to move to a state its current one cannot lead to: a bug in
    the runtime, not in the request."""

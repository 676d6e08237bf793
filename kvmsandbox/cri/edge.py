"""The CRI edge: runtime errors become gRPC statuses with a sentence, never a traceback; RPCs
kvmsandbox does not implement answer UNIMPLEMENTED with a sentence too."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from kvmsandbox.errors import KvmSandboxError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def status_code(error: KvmSandboxError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code, grpc.StatusCode.INTERNAL)


def rpc(fn: F) -> F:
    """Wraps a servicer method: KvmSandboxError -> its status code and message; anything else ->
    INTERNAL with the method's name, logged with its traceback."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except KvmSandboxError as e:
            log.info("%s failed: %s", fn.__name__, e)
            context.abort(status_code(e), str(e))
        except Exception as e:
            log.exception("%s crashed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__} failed inside kvmsandbox: {e!r}")

    return wrapper  # type: ignore[return-value]


def fill_unimplemented(cls: type, service: ServiceDescriptor) -> None:
    """Gives every RPC of ``service`` that ``cls`` does not define an UNIMPLEMENTED answer."""
    for method in service.methods:
        if method.name in cls.__dict__:
            continue

        def unimplemented(self: Any, request: Any, context: grpc.ServicerContext, _name: str = method.name) -> Any:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"kvmsandbox does not implement {_name} yet")

        unimplemented.__name__ = method.name
        setattr(cls, method.name, unimplemented)

"""Errors the agent answers with; each carries the protocol status code sent to the host."""

from __future__ import annotations

from kvmsandbox.agent.v1 import agent_pb2 as pb


class AgentFault(Exception):
    """A request failed; ``code`` is the protocol code, the message is meant for a person."""

    code: pb.Code.ValueType = pb.INTERNAL

    def __init__(self, message: str, code: pb.Code.ValueType | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(AgentFault):
    code = pb.INVALID_ARGUMENT


class NotFound(AgentFault):
    code = pb.NOT_FOUND


class AlreadyExists(AgentFault):
    code = pb.ALREADY_EXISTS


class FailedPrecondition(AgentFault):
    code = pb.FAILED_PRECONDITION

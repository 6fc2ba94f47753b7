"""Domain errors and their one mapping to gRPC status codes."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message


class GatewayError(Exception):
    """An error the caller caused or must know about; carries its gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(GatewayError):
    code = grpc.StatusCode.UNIMPLEMENTED


def parse(cls: type[Message], data: bytes) -> Any:
    """A request message from its bytes; INVALID_ARGUMENT naming the message when they don't parse."""
    try:
        return cls.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"request is not a valid {cls.DESCRIPTOR.full_name}: {exc}") from None


class Status(GatewayError):
    """A status passed on as it came (e.g. from the gateway to a handler and back)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

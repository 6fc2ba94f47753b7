"""Domain errors and their one mapping to gRPC status codes."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

# How much of a caller's own input (a model name, a label, an API name...) a status or a log line
# repeats: every valid name fits (modelmux_common.config.NAME_RE allows 128 characters).
ECHO_LIMIT = 128
# The most a status message carries in all: gRPC refuses trailers past its metadata size limit
# (8 KiB by default), and the caller then gets RESOURCE_EXHAUSTED instead of the real status.
STATUS_LIMIT = 2000


def shown(value: object, *, quote: bool = True, limit: int = ECHO_LIMIT) -> str:
    """A caller's input for a status or a log line (``repr`` unless not ``quote``), cut to
    ``limit`` characters and saying how long it was. The one way user input is echoed."""
    text = value if isinstance(value, str) else str(value)
    cut = text if len(text) <= limit else text[:limit]
    out = repr(cut) if quote else cut
    return out if cut is text else f"{out}... ({len(text)} characters)"


def bounded(message: str) -> str:
    """A status message cut to STATUS_LIMIT characters (the edge's last guard)."""
    if len(message) <= STATUS_LIMIT:
        return message
    return f"{message[:STATUS_LIMIT]}... ({len(message)} characters)"


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


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


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

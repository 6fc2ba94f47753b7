"""One exception type per status the gateway gives on purpose, raised by both client faces."""

from __future__ import annotations

import grpc


class ModelmuxError(Exception):
    """A call failed: ``code`` is the gRPC status, ``details`` the gateway's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class NotFoundError(ModelmuxError):
    """Unknown model, version, label or API (the message lists what exists)."""


class InvalidArgumentError(ModelmuxError):
    """Wrong input name, dtype or shape, or a request that does not parse."""


class FailedPreconditionError(ModelmuxError):
    """The model cannot be served (refused, failed to load): not worth retrying as it is."""


class UnavailableError(ModelmuxError):
    """No gateway reachable, or the model has no loaded version yet (retried by default)."""


class DeadlineExceededError(ModelmuxError):
    """The call's deadline passed."""


class ResourceExhaustedError(ModelmuxError):
    """An in-flight limit or the message size limit was reached."""


class UnauthenticatedError(ModelmuxError):
    """An admin call without a token."""


class PermissionDeniedError(ModelmuxError):
    """An admin call with a wrong token."""


class AlreadyExistsError(ModelmuxError):
    """An async request id already submitted with another payload."""


class InternalError(ModelmuxError):
    """A bug or a failed handler; the message carries the request id to find it in the log."""


_BY_CODE: dict[grpc.StatusCode, type[ModelmuxError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
}


def from_rpc_error(error: grpc.RpcError) -> ModelmuxError:
    """The exception for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = error.code() if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
    return _BY_CODE.get(code, ModelmuxError)(code, details or str(error))

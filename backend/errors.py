"""Domain errors of the backend and their one mapping to gRPC status codes, at the RPC edge."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import structlog

from backend.metrics import REQUEST_SECONDS, REQUESTS

log = structlog.get_logger("modelmux.backend")

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """An error with a precise gRPC status code and a message naming the problem."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def status_code(number: int) -> grpc.StatusCode:
    """gRPC's code for a canonical error number (TensorFlow's error codes use the same numbers)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")
Method = Callable[[Servicer, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]


def rpc_edge(method: Method[Servicer, Request, Response]) -> Method[Servicer, Request, Response]:
    """Maps :class:`ServingError` to its status and anything unexpected to INTERNAL.

    This is the only broad ``except`` of the backend. ``asyncio.CancelledError`` is a
    ``BaseException`` and passes through untouched.
    """

    latency = REQUEST_SECONDS.labels(method.__name__)

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Response:
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except ServingError as exc:
            code = exc.code
            await _abort(context, exc.code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("rpc failed", rpc=method.__name__)
            await _abort(
                context, grpc.StatusCode.INTERNAL, f"{method.__name__}: {type(exc).__name__}: {exc}"
            )
        finally:
            latency.observe(time.perf_counter() - started)
            REQUESTS.labels(method.__name__, code.name).inc()

    return wrapper


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover

"""The request path shared by every gateway RPC: the error edge, the summary line, forwarding.

``edge`` wraps each RPC handler once: it maps domain errors and backend statuses to the caller's
gRPC status in one place, turns anything unexpected into INTERNAL with the request id (the trace
goes to the log only), and writes one summary line per request.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from gateway.errors import GatewayError, Unavailable
from gateway.pool import Backend, Pool
from gateway.routing import pick
from gateway.wire import encode_len_field
from modelmux_common.grpcutil import remaining
from modelmux_common.tfserving import model_pb2

log = structlog.get_logger("modelmux.gateway")

_ids = itertools.count(1)
_PREFIX = f"{os.getpid():x}-"


class Call:
    """What one request resolved to, for its summary line."""

    __slots__ = ("backend", "model", "request_id", "version")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.model = ""
        self.version = 0
        self.backend = ""


Handler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any], Call], Awaitable[bytes]]
RawHandler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)
    return _PREFIX + str(next(_ids))


def edge(rpc: str, handler: Handler, *, log_requests: bool) -> RawHandler:
    async def run(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        call = Call(_request_id(context))
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await handler(request, context, call)
        except GatewayError as exc:
            code = exc.code
            await context.abort(code, exc.message)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            await context.abort(code, exc.details() or code.name)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            if context.done():
                raise
            code = grpc.StatusCode.INTERNAL
            log.exception("internal_error", rpc=rpc, request_id=call.request_id)
            await context.abort(code, f"internal error (request id {call.request_id})")
        finally:
            if log_requests:
                log.info(
                    "request",
                    rpc=rpc,
                    request_id=call.request_id,
                    model=call.model,
                    version=call.version,
                    backend=call.backend,
                    status=code.name,
                    ms=round((time.perf_counter() - started) * 1000, 3),
                )
        raise AssertionError("unreachable")  # context.abort always raises

    return run


def _pin(version: int) -> bytes:
    spec = model_pb2.ModelSpec()
    spec.version.value = version
    return encode_len_field(1, spec.SerializeToString())


class Forwarder:
    """Sends one request to a backend that holds the resolved version, retrying once elsewhere
    when the first backend provably never ran it."""

    def __init__(self, pool: Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def send(
        self,
        method: str,
        data: bytes,
        *,
        model: str,
        version: int | None,
        label: str | None,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
        pin_latest: bool = False,
    ) -> bytes:
        """Forwards ``data`` (a serialized TF Serving request whose model spec is field 1).

        With ``pin_latest``, a request for the latest version gets a model spec naming the version
        routing resolved put in front of its own (the original merges over it and names no
        version), so the backend runs exactly the version that was checked to be AVAILABLE.
        """
        call.model = model
        resolved, candidates = self.pool.table.resolve(model, version, label)
        call.version = resolved
        if pin_latest and version is None and label is None:
            data = _pin(resolved) + data
        backend = pick(candidates)
        assert isinstance(backend, Backend)
        try:
            return await self._once(backend, method, data, context, call)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            self.pool.poke(backend)
            other = pick(candidates, exclude=backend)
            if other is None or remaining(context, self.timeout) <= 0:
                raise Unavailable(
                    f"backend {backend.name} ({backend.address}) is unavailable: {exc.details()}"
                ) from None
            assert isinstance(other, Backend)
            try:
                return await self._once(other, method, data, context, call)
            except grpc.aio.AioRpcError as again:
                if again.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.pool.poke(other)
                raise Unavailable(
                    f"backends {backend.name} and {other.name} are unavailable: {again.details()}"
                ) from None

    async def _once(
        self,
        backend: Backend,
        method: str,
        data: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> bytes:
        call.backend = backend.name
        backend.outstanding += 1
        try:
            result: bytes = await backend.calls[method](
                data, timeout=remaining(context, self.timeout)
            )
            return result
        finally:
            backend.outstanding -= 1

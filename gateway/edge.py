"""The server edge: every gateway RPC's lifecycle, its status, and its summary line.

``edge`` wraps each RPC handler once: it counts the call for draining, maps domain errors and
backend statuses to the caller's gRPC status in one place, turns anything unexpected into INTERNAL
with the request id (the trace goes to the log only), and writes one summary line per request.
The edge calls down into the API modules (gateway.api); nothing below calls back into it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from gateway.auth import HANDLER_CALL_KEY, Guard
from gateway.errors import ECHO_LIMIT, GatewayError, Unavailable, bounded, shown
from gateway.metrics import Route
from modelmux_common import tracing
from modelmux_common.logs import hot_info

log = structlog.get_logger("modelmux.gateway")

_ids = itertools.count(1)
_PREFIX = f"{os.getpid():x}-"


class Call:
    """What one request resolved to, for its summary line."""

    __slots__ = ("_context", "_request_id", "backend", "batch", "model", "span", "version")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._request_id = ""
        self.model = ""
        self.version = 0
        self.backend = ""
        self.batch = 1  # calls in the backend call that answered this one (server-side batching)
        self.span: Any = (
            None  # the call's server span, with tracing on (modelmux_common/tracing.py)
        )

    @property
    def request_id(self) -> str:
        """The caller's x-request-id, or one of ours; worked out only when a line needs it."""
        if not self._request_id:
            self._request_id = _request_id(self._context)
        return self._request_id


Handler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any], Call], Awaitable[bytes]]
RawHandler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's x-request-id (at most ECHO_LIMIT characters of it: it is logged and passed
    on), or one of ours."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)[:ECHO_LIMIT]
    return _PREFIX + str(next(_ids))


class Lifecycle:
    """Counts calls in progress and refuses new ones once the server drains.

    A call counts until grpc has sent its status (a done callback), not only until its handler
    returned: the shutdown closes connections once no call counts, and a reply still on its way
    out then would be lost, the caller seeing UNAVAILABLE for a call that ran.

    ``handler_secret`` is what a handler's own calls to the gateway carry (HANDLER_CALL_KEY, see
    gateway/auth.py): they belong to an Invoke the gateway accepted, so draining lets
    them through and gateway.auth does not ask them for a token."""

    def __init__(self, handler_secret: str = "") -> None:
        self._secret = handler_secret.encode()
        self.active = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def begin(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.active += 1
        self.idle.clear()
        context.add_done_callback(self._done)  # type: ignore[arg-type]  # (the stub wants its own class)

    def _done(self, _: object) -> None:
        self.active -= 1
        if not self.active:
            self.idle.set()

    def from_handler(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        if not self._secret:
            return False
        for key, value in context.invocation_metadata() or ():
            if key == HANDLER_CALL_KEY and isinstance(value, str):
                return hmac.compare_digest(value.encode(), self._secret)
        return False

    async def drained(self, grace: float) -> bool:
        """Refuse new calls and wait (at most ``grace`` s) for those in progress; True if all ended."""
        self.draining = True
        try:
            await asyncio.wait_for(self.idle.wait(), grace)
        except TimeoutError:
            return False
        return True


def edge(
    rpc: str,
    handler: Handler,
    *,
    log_requests: bool,
    lifecycle: Lifecycle,
    guard: Guard | None = None,
    metrics: Route | None = None,
) -> RawHandler:
    """``handler`` as a gRPC method; ``guard`` (gateway.auth) runs before it when given;
    ``metrics``: the route's request counter and latency (None: metrics are off)."""
    summary = hot_info("modelmux.gateway")
    traced = tracing.active()  # decided once: with tracing off a call makes no span at all
    timed = log_requests or metrics is not None

    async def run(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        call = Call(context)
        if traced is not None:
            call.span = traced.server(rpc, context.invocation_metadata())
        started = time.perf_counter() if timed else 0.0
        code = grpc.StatusCode.OK
        lifecycle.begin(context)
        try:
            if lifecycle.draining and not lifecycle.from_handler(context):
                raise Unavailable("the gateway is shutting down; retry on another instance")
            if guard is not None:
                guard(context)
            return await handler(request, context, call)
        except GatewayError as exc:
            code = exc.code
            await context.abort(code, bounded(exc.message))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            await context.abort(code, bounded(exc.details() or code.name))
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
            if call.span is not None:
                traced.end(call.span, code)  # type: ignore[union-attr]
            if metrics is not None:
                metrics.observe(call.model, call.version, code, time.perf_counter() - started)
            if log_requests:
                summary(
                    "request",
                    rpc=rpc,
                    request_id=call.request_id,
                    model=call.model if len(call.model) <= ECHO_LIMIT else shown(call.model),
                    version=call.version,
                    backend=call.backend,
                    batch=call.batch,
                    status=code.name,
                    ms=round((time.perf_counter() - started) * 1000, 3),
                )
        raise AssertionError("unreachable")  # context.abort always raises

    return run


def stream_edge(
    handler: Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]],
    *,
    lifecycle: Lifecycle,
    guard: Guard | None = None,
) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
    """The error edge of a server-streaming RPC (long-lived: not counted for draining)."""

    async def run(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            if lifecycle.draining:
                raise Unavailable("the gateway is shutting down; retry on another instance")
            if guard is not None:
                guard(context)
            async for item in handler(request, context):
                yield item
        except GatewayError as exc:
            await context.abort(exc.code, bounded(exc.message))

    return run

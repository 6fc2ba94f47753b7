"""The request path shared by every gateway RPC: the error edge, the summary line, forwarding.

``edge`` wraps each RPC handler once: it maps domain errors and backend statuses to the caller's
gRPC status in one place, turns anything unexpected into INTERNAL with the request id (the trace
goes to the log only), and writes one summary line per request.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import structlog

from gateway.batching import Batcher, Policy
from gateway.errors import (
    ECHO_LIMIT,
    GatewayError,
    ResourceExhausted,
    Unavailable,
    bounded,
    parse,
    shown,
)
from gateway.pool import Backend, Pool
from gateway.routing import Target, pick
from gateway.wire import encode_len_field
from modelmux_common.grpcutil import remaining
from modelmux_common.logs import hot_info
from modelmux_common.tfserving import inference_pb2, model_pb2

log = structlog.get_logger("modelmux.gateway")

_ids = itertools.count(1)
_PREFIX = f"{os.getpid():x}-"


class Call:
    """What one request resolved to, for its summary line."""

    __slots__ = ("_context", "_request_id", "backend", "batch", "model", "version")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._request_id = ""
        self.model = ""
        self.version = 0
        self.backend = ""
        self.batch = 1  # calls in the backend call that answered this one (server-side batching)

    @property
    def request_id(self) -> str:
        """The caller's x-request-id, or one of ours; worked out only when a line needs it."""
        if not self._request_id:
            self._request_id = _request_id(self._context)
        return self._request_id


Handler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any], Call], Awaitable[bytes]]
RawHandler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)
    return _PREFIX + str(next(_ids))


def _from_handler(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """A handler's own call to the gateway (see gateway/handlers/clients.py): it belongs to an
    Invoke the gateway accepted, so draining lets it through."""
    return ("x-modelmux-handler-call", "1") in (context.invocation_metadata() or ())


class Lifecycle:
    """Counts calls in progress and refuses new ones once the server drains.

    A call counts until grpc has sent its status (a done callback), not only until its handler
    returned: the shutdown closes connections once no call counts, and a reply still on its way
    out then would be lost, the caller seeing UNAVAILABLE for a call that ran."""

    def __init__(self) -> None:
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

    async def drained(self, grace: float) -> bool:
        """Refuse new calls and wait (at most ``grace`` s) for those in progress; True if all ended."""
        self.draining = True
        try:
            await asyncio.wait_for(self.idle.wait(), grace)
        except TimeoutError:
            return False
        return True


def edge(rpc: str, handler: Handler, *, log_requests: bool, lifecycle: Lifecycle) -> RawHandler:
    summary = hot_info("modelmux.gateway")

    async def run(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        call = Call(context)
        started = time.perf_counter() if log_requests else 0.0
        code = grpc.StatusCode.OK
        lifecycle.begin(context)
        try:
            if lifecycle.draining and not _from_handler(context):
                raise Unavailable("the gateway is shutting down; retry on another instance")
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


# where the model spec sits in each forwarded method's response
_RESPONSE_SPEC_FIELD = {"Predict": 2, "Classify": 2, "Regress": 2, "GetModelMetadata": 1}


@functools.lru_cache(maxsize=4096)
def _spec_field(number: int, name: str, version: int | None = None) -> bytes:
    """Field ``number`` holding ModelSpec{name, version}: the bytes appended to override a spec
    (cached: the same few servable/version pairs recur on every call)."""
    spec = model_pb2.ModelSpec(name=name)
    if version is not None:
        spec.version.value = version
    return encode_len_field(number, spec.SerializeToString())


def _multi_inference(data: bytes, servable: str, version: int) -> bytes:
    request = parse(inference_pb2.MultiInferenceRequest, data)
    for task in request.tasks:
        task.model_spec.name = servable
        task.model_spec.version.value = version
    return bytes(request.SerializeToString())


def _multi_inference_reply(data: bytes, model: str) -> bytes:
    response = inference_pb2.MultiInferenceResponse.FromString(data)
    for result in response.results:
        result.model_spec.name = model
    return bytes(response.SerializeToString())


def stream_edge(
    handler: Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]],
    *,
    lifecycle: Lifecycle,
) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
    """The error edge of a server-streaming RPC (long-lived: not counted for draining)."""

    async def run(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            if lifecycle.draining:
                raise Unavailable("the gateway is shutting down; retry on another instance")
            async for item in handler(request, context):
                yield item
        except GatewayError as exc:
            await context.abort(exc.code, bounded(exc.message))

    return run


# Codes that say the backend itself is in trouble, whatever the request: they count for ejection.
# (INTERNAL is left out: a request can provoke it, and requests must not steer ejection.)
_BACKEND_FAULTS = (grpc.StatusCode.UNAVAILABLE,)
EJECT_AFTER = 3
EJECT_SECONDS = 5.0


def _ejected_until(target: Target) -> float:
    backend = target.backend
    return backend.ejected_until if isinstance(backend, Backend) else 0.0


def _note_fault(backend: Backend) -> None:
    """Passive outlier ejection: after EJECT_AFTER failed calls in a row, routing avoids the
    backend for EJECT_SECONDS (unless no other backend holds the version)."""
    backend.call_failures += 1
    if backend.call_failures >= EJECT_AFTER:
        backend.ejected_until = time.monotonic() + EJECT_SECONDS
        backend.call_failures = 0
        log.warning("backend_ejected", backend=backend.name, seconds=EJECT_SECONDS)


# Answers proving the backend never ran the call: it was unreachable, or it no longer holds the
# servable routing chose (a restart or an unload it has not reported yet). Retried elsewhere once.
_NEVER_RAN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)


class Forwarder:
    """Sends one request to a backend that holds the resolved version, retrying once elsewhere
    when the first backend provably never ran it.

    The request's model spec is overridden when the backend must see something else than the
    client sent: the resolved version (for labels, and for "latest" unless it is the chosen
    backend's own latest, see ``Target.top``) and the servable's name. The override is a second
    model spec appended to the bytes, which a parser merges over the first, so the tensors are
    never decoded. Responses get the client's model name back the same way.
    """

    def __init__(
        self, pool: Pool, *, timeout: float, max_inflight: int, backend_max_inflight: int
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.backend_max_inflight = backend_max_inflight
        self.inflight = 0
        self.batcher: Batcher | None = None

    def batch(self, policies: Mapping[str, Policy], max_bytes: int) -> None:
        """Batches the Predict calls of these APIs (by API name); see gateway.batching."""
        self.batcher = Batcher(self, policies, max_bytes)

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
        alone: bool = False,
        partial: bool = False,
    ) -> bytes:
        """Forwards ``data``, a serialized TF Serving request for ``model`` asking for
        ``version`` / ``label`` / latest (both None). A Predict call of an API with server-side
        batching may share one backend call with others, unless ``alone`` (a call from the
        batcher, which applies gateway.max_inflight itself). ``partial``: the model spec was read
        from the request's first fields only (see gateway.facade.model_spec_of), so the backend
        gets the resolved one, and the call is not batched (batching parses the whole request)."""
        call.model = model
        if method == "Predict" and self.batcher is not None and not (alone or partial):
            policy = self.batcher.policy(model)
            if policy is not None:
                return await self.batcher.submit(
                    policy, data, model=model, version=version, label=label, context=context,
                    call=call,
                )  # fmt: skip
        resolved, candidates = self.pool.table.resolve(model, version, label)
        call.version = resolved
        if self.inflight >= self.max_inflight and not alone:
            raise ResourceExhausted(
                f"the gateway's in-flight limit ({self.max_inflight}, gateway.max_inflight) is reached"
            )
        if len(candidates) == 1:  # the common case; ejection only matters with a choice
            target: Target | None = candidates[0]
            if candidates[0].outstanding >= self.backend_max_inflight:
                target = None
        else:
            now = time.monotonic()
            healthy = [c for c in candidates if _ejected_until(c) <= now]
            candidates = [
                c for c in healthy or candidates if c.outstanding < self.backend_max_inflight
            ]
            target = pick(candidates)
        if target is None:
            raise ResourceExhausted(
                f"every backend holding {model} version {resolved} is at its in-flight limit "
                f"({self.backend_max_inflight}, gateway.backend_max_inflight)"
            )
        latest = version is None and label is None
        if partial:  # as if the request asked for nothing: the resolved spec is always appended
            version, latest = None, False
        self.inflight += 1
        try:
            return await self._once(
                target, method, data, model, version, resolved, latest, context, call
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _NEVER_RAN:
                raise
            return await self._retry(
                exc, target, candidates, method, data, model, version, resolved, latest, context,
                call,
            )  # fmt: skip
        finally:
            self.inflight -= 1

    async def _retry(
        self,
        exc: grpc.aio.AioRpcError,
        target: Target,
        candidates: Sequence[Target],
        method: str,
        data: bytes,
        model: str,
        version: int | None,
        resolved: int,
        latest: bool,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> bytes:
        """The first backend provably never ran the call: once more on another one."""
        first = target.backend
        assert isinstance(first, Backend)
        self.pool.poke(first)
        other = pick(candidates, exclude=target)
        if other is None or remaining(context, self.timeout) <= 0:
            raise Unavailable(
                f"backend {first.name} ({first.address}) could not run the call: {exc.details()}"
            ) from None
        try:
            return await self._once(
                other, method, data, model, version, resolved, latest, context, call
            )
        except grpc.aio.AioRpcError as again:
            if again.code() not in _NEVER_RAN:
                raise
            assert isinstance(other.backend, Backend)
            self.pool.poke(other.backend)
            raise Unavailable(
                f"backends {first.name} and {other.backend.name} could not run the call: {again.details()}"
            ) from None

    async def _once(
        self,
        target: Target,
        method: str,
        data: bytes,
        model: str,
        asked: int | None,
        resolved: int,
        latest: bool,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> bytes:
        backend = target.backend
        assert isinstance(backend, Backend)
        renamed = target.servable != model
        if method == "MultiInference":
            data = _multi_inference(data, target.servable, resolved)
        elif renamed or (asked != resolved and not (latest and target.top)):
            # pinned to the version routing chose, unless the client asked for latest and the
            # backend's own latest is that version (no copy of a large request then)
            data = data + _spec_field(1, target.servable, resolved)
        call.backend = backend.name
        backend.outstanding += 1
        try:
            reply: bytes = await backend.calls[method](
                data, timeout=remaining(context, self.timeout)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _BACKEND_FAULTS:
                _note_fault(backend)
            raise
        finally:
            backend.outstanding -= 1
        backend.call_failures = 0
        if renamed:
            if method == "MultiInference":
                return _multi_inference_reply(reply, model)
            reply = reply + _spec_field(_RESPONSE_SPEC_FIELD[method], model)
        return reply

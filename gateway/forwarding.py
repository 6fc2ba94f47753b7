"""Forwarding: one resolved request to one backend that holds its version, retried once elsewhere
when the first backend provably never ran it.

The request's model spec is overridden when the backend must see something else than the client
sent: the resolved version (for labels, and for "latest" unless it is the chosen backend's own
latest, see ``Target.top``) and the servable's name. The override is a second model spec appended
to the bytes, which a parser merges over the first, so the tensors are never decoded. Responses
get the client's model name back the same way.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Sequence
from typing import Any

import grpc
import structlog

from gateway import metrics as m
from gateway.edge import Call
from gateway.errors import ResourceExhausted, Unavailable, parse
from gateway.request import Resolved
from gateway.routing import Endpoint, Target
from gateway.wire import encode_len_field
from modelmux_common import tracing
from modelmux_common.grpcutil import remaining
from modelmux_common.tfserving import inference_pb2, model_pb2

log = structlog.get_logger("modelmux.gateway")

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
_OK = grpc.StatusCode.OK
# where the model spec sits in each forwarded method's response
_RESPONSE_SPEC_FIELD = {"Predict": 2, "Classify": 2, "Regress": 2, "GetModelMetadata": 1}

# Codes that say the backend itself is in trouble, whatever the request: they count for ejection.
# (INTERNAL is left out: a request can provoke it, and requests must not steer ejection.)
_BACKEND_FAULTS = (grpc.StatusCode.UNAVAILABLE,)
EJECT_AFTER = 3
EJECT_SECONDS = 5.0

# Answers proving the backend never ran the call: it was unreachable, or it no longer holds the
# servable routing chose (a restart or an unload it has not reported yet). Retried elsewhere once.
_NEVER_RAN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)


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


def pick(candidates: Sequence[Target], exclude: Target | None = None) -> Target | None:
    """Least outstanding requests between two random choices (power of two choices)."""
    if exclude is not None:
        candidates = [c for c in candidates if c.backend is not exclude.backend]
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        return candidates[0]
    a, b = random.sample(range(n), 2)
    first, second = candidates[a], candidates[b]
    return first if first.backend.outstanding <= second.backend.outstanding else second


def _note_fault(backend: Endpoint) -> None:
    """Passive outlier ejection: after EJECT_AFTER failed calls in a row, routing avoids the
    backend for EJECT_SECONDS (unless no other backend holds the version)."""
    backend.call_failures += 1
    if backend.call_failures >= EJECT_AFTER:
        backend.ejected_until = time.monotonic() + EJECT_SECONDS
        backend.call_failures = 0
        m.EJECTIONS.labels(backend.name).inc()
        log.warning("backend_ejected", backend=backend.name, seconds=EJECT_SECONDS)


def _backend_span(target: Target, request: Resolved, call: Call) -> tracing.Client:
    """The backend call's span (tracing on), a child of the call's own."""
    traced = tracing.active()
    assert traced is not None
    backend = target.backend
    return traced.client(
        PREDICTION_SERVICE,
        request.method,
        call.span,
        {
            "server.address": backend.address,
            "modelmux.backend": backend.name,
            "modelmux.model": request.model,
            "modelmux.version": request.version,
        },
    )


class Forwarder:
    """The last layer of the request path: picks a target, sends, retries once."""

    def __init__(
        self,
        *,
        timeout: float,
        backend_max_inflight: int,
        metrics: m.RequestMetrics | None = None,
    ) -> None:
        self.timeout = timeout
        self.backend_max_inflight = backend_max_inflight
        self.metrics = metrics

    async def send(
        self, request: Resolved, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        call.model = request.model
        call.version = request.version
        candidates = request.candidates
        limit = self.backend_max_inflight
        if len(candidates) == 1:  # the common case; ejection only matters with a choice
            target: Target | None = candidates[0]
            if candidates[0].backend.outstanding >= limit:
                target = None
        else:
            now = time.monotonic()
            healthy = [c for c in candidates if c.backend.ejected_until <= now]
            candidates = [c for c in healthy or candidates if c.backend.outstanding < limit]
            target = pick(candidates)
        if target is None:
            if self.metrics is not None:
                self.metrics.rejected["gateway.backend_max_inflight"].inc()
            raise ResourceExhausted(
                f"every backend holding {request.model} version {request.version} is at its "
                f"in-flight limit ({limit}, gateway.backend_max_inflight)"
            )
        try:
            return await self._once(target, request, context, call)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _NEVER_RAN:
                raise
            return await self._retry(exc, target, candidates, request, context, call)

    async def _retry(
        self,
        exc: grpc.aio.AioRpcError,
        first: Target,
        candidates: Sequence[Target],
        request: Resolved,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> bytes:
        """The first backend provably never ran the call: once more on another one."""
        first.backend.poke()
        other = pick(candidates, exclude=first)
        name = first.backend.name
        m.RETRIES.labels(name).inc()
        if other is None or remaining(context, self.timeout) <= 0:
            raise Unavailable(
                f"backend {name} ({first.backend.address}) could not run the call: {exc.details()}"
            ) from None
        try:
            return await self._once(other, request, context, call)
        except grpc.aio.AioRpcError as again:
            if again.code() not in _NEVER_RAN:
                raise
            other.backend.poke()
            raise Unavailable(
                f"backends {name} and {other.backend.name} could not run the call: {again.details()}"
            ) from None

    async def _once(
        self,
        target: Target,
        request: Resolved,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> bytes:
        backend = target.backend
        method, data, model = request.method, request.data, request.model
        renamed = target.servable != model
        if method == "MultiInference":
            data = _multi_inference(data, target.servable, request.version)
        elif renamed or (request.asked != request.version and not (request.latest and target.top)):
            # pinned to the version routing chose, unless the client asked for latest and the
            # backend's own latest is that version (no copy of a large request then)
            data = data + _spec_field(1, target.servable, request.version)
        call.backend = backend.name
        span = None if call.span is None else _backend_span(target, request, call)
        code = _OK
        backend.outstanding += 1
        metrics = self.metrics
        if metrics is not None:
            latency = metrics.backend(backend.name)
            started = time.perf_counter()
        try:
            reply = await backend.transport.forward(
                method,
                data,
                timeout=remaining(context, self.timeout),
                metadata=None if span is None else span.headers,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _BACKEND_FAULTS:
                _note_fault(backend)
            if metrics is not None:
                metrics.backend_error(backend.name, exc.code())
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            backend.outstanding -= 1
            if span is not None:
                span.end(code)
            if metrics is not None:
                latency.observe(time.perf_counter() - started)
        backend.call_failures = 0
        if renamed:
            if method == "MultiInference":
                return _multi_inference_reply(reply, model)
            reply = reply + _spec_field(_RESPONSE_SPEC_FIELD[method], model)
        return reply

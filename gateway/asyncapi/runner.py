"""Feeds an AsyncAPI's handler workers from its queue, and keeps the queue and store tidy.

:class:`Runner` receives requests as handler capacity frees (``processes_per_replica x
threads_per_process``), oldest first, holds each (its visibility renewed while the handler runs),
calls the worker's ``handle_async``, records the outcome with create-if-absent, and deletes the
message. A handler error is retried (the message is released with a backoff) until
``async.max_attempts``, then FAILED with the error; a worker that died releases the message at
once, so the request runs again (at least once). :class:`Sweeper` records the dead letters (the
requests whose every delivery was lost with its worker or gateway) as FAILED, deletes expired
results, and updates the queue metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time

import grpc
import structlog
from prometheus_client import Counter, Gauge

from gateway.asyncapi import payloads
from gateway.asyncapi.records import COMPLETED, FAILED, Requests, Status
from gateway.handlers.pool import HandlerFailed, HandlerPool, WorkerLost
from gateway.handlers.worker import HANDLE_ASYNC
from gateway.tensors import from_value
from gateway.work import Blob, Message, Queue, Store, WorkError, holding
from modelmux.v1.inference_pb2 import InvokeResponse
from modelmux_common import tracing
from modelmux_common.config import AsyncConfig
from modelmux_common.metrics import REGISTRY

log = structlog.get_logger("modelmux.async")

OUTCOMES = Counter(
    "modelmux_async_requests",
    "Async requests ended, by API and outcome",
    ["api", "outcome"],
    registry=REGISTRY,
)
QUEUED = Gauge("modelmux_async_queued", "Requests waiting in the queue", ["api"], registry=REGISTRY)
OLDEST = Gauge(
    "modelmux_async_oldest_queued_seconds",
    "Age of the oldest request not yet ended (embedded store only: SQS does not tell)",
    ["api"],
    registry=REGISTRY,
)
RUNNING = Gauge(
    "modelmux_async_in_progress",
    "Requests this gateway's workers run now",
    ["api"],
    registry=REGISTRY,
)
DEAD = Gauge(
    "modelmux_async_dead_letters", "Dead letters not yet recorded", ["api"], registry=REGISTRY
)

# Longest wait of one receive: SQS's long poll (the embedded queue wakes at once anyway).
RECEIVE_WAIT = 20.0
MAX_BACKOFF = 30.0


class Runner:
    """One AsyncAPI's consumer in this gateway."""

    def __init__(
        self, requests: Requests, queue: Queue, pool: HandlerPool, config: AsyncConfig
    ) -> None:
        self.requests = requests
        self.queue = queue
        self.pool = pool
        self.config = config
        self.api = requests.api
        self.capacity = pool.api.processes_per_replica * pool.api.threads_per_process
        self.running: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()
        self._main: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._main = asyncio.create_task(self._loop(), name=f"async-{self.api}")

    async def close(self, grace: float) -> None:
        """Stops receiving, lets running requests end within ``grace``, then gives the others
        back to the queue (another gateway, or this one restarted, runs them again)."""
        if self._main is not None:
            self._main.cancel()
            await asyncio.wait([self._main])
        if self.running:
            await asyncio.wait(list(self.running), timeout=grace)
        for task in list(self.running):
            task.cancel()
        if self.running:
            await asyncio.wait(list(self.running))

    async def _loop(self) -> None:
        while True:
            while len(self.running) >= self.capacity or not self.pool.live:
                self._freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), 0.5)  # a worker replaced
            try:
                messages = await self.queue.receive(
                    max_messages=min(10, self.capacity - len(self.running)),
                    visibility_timeout=self.config.visibility_timeout,
                    wait=RECEIVE_WAIT,
                )
            except WorkError as exc:
                log.warning("async_receive_failed", api=self.api, error=str(exc))
                await asyncio.sleep(1.0)
                continue
            for message in messages:
                task = asyncio.create_task(self._hold(message))
                self.running.add(task)
                RUNNING.labels(self.api).set(len(self.running))
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        RUNNING.labels(self.api).set(len(self.running))
        self._freed.set()

    async def _hold(self, message: Message) -> None:
        try:
            async with holding(
                self.queue, message, visibility_timeout=self.config.visibility_timeout
            ):
                await self._run(message)
        except asyncio.CancelledError:
            # the gateway is stopping: give it back now rather than when its lease lapses
            with contextlib.suppress(Exception):
                await asyncio.shield(self.queue.release(message))
            raise
        except Exception:  # the edge of a background task: the message comes back by itself
            log.exception("async_run_crashed", api=self.api, request_id=message.body)

    async def _run(self, message: Message) -> None:
        request_id, attempt = message.body, message.receive_count
        outcome = await self.requests.outcome(request_id)
        if outcome is not None:  # cancelled, or a delivery whose run ended before its delete
            await self.requests.settle(request_id, outcome)
            await self.queue.delete(message)
            return
        payload = await self.requests.store.get(self.requests.key(request_id, "payload"))
        if payload is None:
            await self._end(request_id, FAILED, error="the payload is gone (deleted or expired)")
            await self.queue.delete(message)
            return
        status = await self.requests.start(request_id, attempt, payload)
        error = ""
        try:
            reply = await self._handle(payload, status, request_id, attempt)
        except HandlerFailed as exc:
            error = str(exc)
        except WorkerLost as exc:
            log.warning("async_worker_lost", api=self.api, request_id=request_id, attempt=attempt)
            await self.requests.retry(request_id, str(exc))
            await self.queue.release(message)  # runs again (counts as an attempt)
            return
        else:
            if reply.WhichOneof("result") == "raw":
                body, content_type = reply.raw, payloads.OCTETS
            else:
                body = json.dumps(from_value(reply.json), separators=(",", ":")).encode()
                content_type = payloads.JSON
            await self._end(request_id, COMPLETED, body=body, content_type=content_type)
            await self.queue.delete(message)
            return
        if attempt < self.config.max_attempts:
            await self.requests.retry(request_id, error)
            await self.queue.release(message, delay=min(MAX_BACKOFF, 2.0 ** (attempt - 1)))
            return
        await self._end(request_id, FAILED, error=error, attempts=attempt)
        await self.queue.delete(message)

    async def _handle(
        self, payload: Blob, status: Status | None, request_id: str, attempt: int
    ) -> InvokeResponse:
        """The handler's run; with tracing on, in a span linked to the Submit call's."""
        run = functools.partial(
            self.pool.handle_async,
            payload.body,
            request_id=request_id,
            content_type=payload.content_type,
            timeout=self.config.timeout,
        )
        traced = tracing.active()
        if traced is None:
            return await run()
        span = _span(traced, status, request_id, attempt)
        code = grpc.StatusCode.OK
        try:
            return await run(trace=span.headers)
        except HandlerFailed:
            code = grpc.StatusCode.INTERNAL
            raise
        except WorkerLost:
            code = grpc.StatusCode.UNAVAILABLE
            raise
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            span.end(code)

    async def _end(self, request_id: str, state: str, **outcome: object) -> None:
        status = await self.requests.finish(request_id, state, **outcome)  # type: ignore[arg-type]
        if status is not None and status.state == state:  # this run's outcome stood
            OUTCOMES.labels(self.api, state).inc()


def _span(
    traced: tracing.Tracing, status: Status | None, request_id: str, attempt: int
) -> tracing.Client:
    """The span of one run of an async request: linked to its Submit call's span."""
    service, method = HANDLE_ASYNC
    return traced.linked(
        f"{service}/{method}",
        "" if status is None else status.traceparent,
        {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "modelmux.api": "" if status is None else status.api,
            "modelmux.request_id": request_id,
            "modelmux.attempt": attempt,
        },
    )


class Sweeper:
    """Per store: deletes expired results; per API: records dead letters, updates metrics."""

    def __init__(self, store: Store, apis: list[Requests], *, exact_age: bool) -> None:
        self.store = store
        self.apis = apis
        self.exact_age = exact_age
        self._task: asyncio.Task[None] | None = None

    def start(self, every: float) -> None:
        self._task = asyncio.create_task(self._loop(every), name="async-sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    async def _loop(self, every: float) -> None:
        last_sweep = 0.0
        while True:
            try:
                for requests in self.apis:
                    await self.drain_dead(requests)
                    await self._measure(requests)
                if time.monotonic() - last_sweep > 60:
                    last_sweep = time.monotonic()
                    swept = await self.store.sweep()
                    if swept:
                        log.info("async_swept", objects=swept)
            except WorkError as exc:
                log.warning("async_sweep_failed", error=str(exc))
            await asyncio.sleep(every)

    async def drain_dead(self, requests: Requests) -> None:
        dead = requests.queue.dead
        while dead is not None:
            messages = await dead.receive(max_messages=10, visibility_timeout=60)
            if not messages:
                return
            for message in messages:
                status = await requests.finish(
                    message.body,
                    FAILED,
                    error=(
                        f"no run finished in {requests.config.max_attempts} attempts (the "
                        "handler worker or the gateway running it died each time)"
                    ),
                    attempts=requests.config.max_attempts,
                )
                if status is not None and status.state == FAILED:
                    OUTCOMES.labels(requests.api, FAILED).inc()
                await dead.delete(message)

    async def _measure(self, requests: Requests) -> None:
        stats = await requests.queue.stats()
        QUEUED.labels(requests.api).set(stats.visible + stats.delayed)
        DEAD.labels(requests.api).set(stats.dead)
        if self.exact_age:
            OLDEST.labels(requests.api).set(stats.oldest_age or 0.0)

"""Handler workers seen from the gateway: started, replaced when they die, and called.

Every API with a handler gets ``processes_per_replica`` worker processes (gateway/handlers/worker.py)
serving on unix sockets in the gateway's runtime folder. Calls go to the worker with the fewest
calls in flight. The gateway never runs handler code itself, so a slow or broken handler cannot
hold up Predict calls or another API.

Statuses: what a worker sets is passed on (the handler's own INTERNAL carries the request id); a
call whose worker dies gets INTERNAL saying so, and the worker is replaced; past the deadline
(the caller's, at most gateway.handler_timeout) the call gets DEADLINE_EXCEEDED naming the limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from gateway.auth import HANDLER_CALL_KEY
from gateway.edge import Call
from gateway.errors import (
    FailedPrecondition,
    GatewayError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Status,
    Unavailable,
    parse,
    shown,
)
from gateway.handlers import userproto
from gateway.handlers.worker import CONTENT_TYPE_KEY
from gateway.handlers.worker import HANDLE_ASYNC as HANDLE_ASYNC_METHOD
from gateway.metrics import HANDLER_RESTARTS, HANDLER_SECONDS
from modelmux.v1 import inference_pb2
from modelmux_common import tracing
from modelmux_common.config import ApiConfig, Config, ConfigError
from modelmux_common.grpcutil import message_size_options, remaining
from modelmux_common.supervision import AsyncChild

log = structlog.get_logger("modelmux.gateway")

INVOKE = "/modelmux.v1.Inference/Invoke"
HANDLE_ASYNC = "/{}/{}".format(*HANDLE_ASYNC_METHOD)
MAX_RESTART_BACKOFF = 30.0
# A worker that dies sooner than this after starting is restarted with backoff.
STABLE_AFTER = 10.0
# Caller metadata a worker must not receive again (gRPC sets its own).
_DROPPED = ("grpc-", ":")
_SKIPPED_KEYS = {"user-agent", "x-request-id", HANDLER_CALL_KEY}
_TRACE_KEYS = {tracing.TRACEPARENT, tracing.TRACESTATE}


class HandlerStartError(Exception):
    """A handler that cannot start: the message names the API and the reason."""


class HandlerFailed(Exception):
    """handle_async raised (the message is the exception's type and text) or timed out."""


class WorkerLost(Exception):
    """The worker running an async request died, or none was running: the request did not end."""


@dataclass(eq=False)
class _Worker:
    index: int
    socket: str
    process: AsyncChild | None = None
    channel: grpc.aio.Channel | None = None
    inflight: int = 0
    live: bool = False
    started: float = 0.0  # when it last became ready (monotonic)


@dataclass(eq=False)
class HandlerPool:
    """One API's worker processes."""

    config: Config
    api: ApiConfig
    number: int  # the API's position in the config, for short socket names
    runtime_dir: str
    gateway: str  # where tensorflow_client reaches the gateway
    config_snapshot: str  # the gateway's config as loaded, for the workers (pickle)
    descriptors: str = ""  # compiled protobuf_path, when the API has one
    env: dict[str, str] = field(default_factory=dict)  # e.g. the metrics folder
    workers: list[_Worker] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _closing: bool = False
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)
    _retired: set[grpc.aio.Channel] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.workers = [
            _Worker(i, os.path.join(self.runtime_dir, f"h{self.number}-{i}.sock"))
            for i in range(self.api.processes_per_replica)
        ]
        self.limit = self.config.gateway.max_inflight
        self.timeout = self.config.gateway.handler_timeout
        # the gateway's own tokens stay with the gateway: handler code never sees them
        protected = self.config.gateway.auth.invoke is not None
        self._skipped = _SKIPPED_KEYS | ({"authorization"} if protected else set())
        self._skipped_traced = self._skipped | _TRACE_KEYS

    async def start(self) -> None:
        """Starts every worker; raises :class:`HandlerStartError` when one cannot start."""
        results = await asyncio.gather(
            *(self._spawn(w) for w in self.workers), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                await self.close()
                raise result
        self._tasks = [
            asyncio.create_task(self._supervise(w), name=f"handler-{self.api.name}-{w.index}")
            for w in self.workers
        ]

    async def _spawn(self, worker: _Worker) -> None:
        command = [
            sys.executable,
            "-m",
            "gateway.handlers.worker",
            "--config",
            self.config_snapshot,
            "--api",
            self.api.name,
            "--index",
            str(worker.index),
            "--socket",
            worker.socket,
            "--gateway",
            self.gateway,
            "--cache-dir",
            os.path.join(self.runtime_dir, f"cache-h{self.number}-{worker.index}"),
        ]
        if self.descriptors:
            command += ["--descriptors", self.descriptors]
        what = f"API {self.api.name!r}: handler {self.api.handler_path}"
        try:
            # dies with the gateway, in a session of its own (modelmux_common/supervision.py)
            process = AsyncChild(command, env=self.env, stdout=True)
        except OSError as exc:
            raise HandlerStartError(f"{what}: cannot start a worker: {exc}") from None
        worker.process = process  # close() stops it even while it starts
        try:
            line = await asyncio.wait_for(
                process.readline(), self.config.gateway.handler_start_timeout
            )
        except (TimeoutError, ValueError) as exc:
            await process.stop(grace=0)
            raise HandlerStartError(
                f"{what} did not start within gateway.handler_start_timeout "
                f"({self.config.gateway.handler_start_timeout:g} s)"
                if isinstance(exc, TimeoutError)
                else f"{what} failed to start: unreadable start-up report ({exc})"
            ) from None
        try:
            status = json.loads(line) if line.strip() else {}
        except ValueError:
            status = {}
        if not status.get("ready"):
            code = await process.wait()
            reason = (
                status.get("failed") or f"the worker exited with {_exit(code)} before it was ready"
            )
            raise HandlerStartError(f"{what} failed to start: {reason}")
        worker.channel = grpc.aio.insecure_channel(
            f"unix:{worker.socket}",
            options=[
                *message_size_options(self.config.gateway.max_message_bytes),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        worker.started = time.monotonic()
        worker.live = True
        log.info("handler_worker_started", api=self.api.name, index=worker.index, pid=process.pid)

    async def _supervise(self, worker: _Worker) -> None:
        """Replaces the worker whenever it exits, with backoff while it cannot start or keeps
        dying soon after starting."""
        backoff = 0.5
        while not self._closing:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.live = False
            if self._closing:
                return
            log.error(
                "handler_worker_exited", api=self.api.name, index=worker.index, exit=_exit(code)
            )
            HANDLER_RESTARTS.labels(self.api.name).inc()
            # calls still on the old channel fail by themselves (the socket is gone); it is closed
            # once they had time to, since closing cancels them without a status
            if worker.channel is not None:
                self._retire(worker.channel)
                worker.channel = None
            if time.monotonic() - worker.started > STABLE_AFTER:
                backoff = 0.5
            started = time.monotonic()
            while not self._closing:
                try:
                    if time.monotonic() - worker.started < STABLE_AFTER:
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, MAX_RESTART_BACKOFF)
                    await self._spawn(worker)
                    log.info(
                        "handler_worker_replaced",
                        api=self.api.name,
                        index=worker.index,
                        seconds=round(time.monotonic() - started, 3),
                    )
                    break
                except Exception as exc:  # the edge of a background task: keep trying
                    log.error("handler_worker_restart_failed", api=self.api.name, error=str(exc))
                    worker.started = time.monotonic()

    def _retire(self, channel: grpc.aio.Channel) -> None:
        async def later() -> None:
            await asyncio.sleep(self.timeout + 1)  # every call on it had a shorter deadline
            self._retired.discard(channel)
            await channel.close()

        self._retired.add(channel)
        task = asyncio.create_task(later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        self._closing = True
        for task in [*self._tasks, *self._retiring]:
            task.cancel()
        await asyncio.gather(*(self._stop(w) for w in self.workers))
        await asyncio.gather(*(c.close() for c in self._retired))
        self._retired.clear()

    async def _stop(self, worker: _Worker) -> None:
        process, worker.live = worker.process, False
        if process is not None:
            await process.stop(grace=self.config.gateway.shutdown_grace + 2)
        if worker.channel is not None:
            await worker.channel.close()

    # -- calls ----------------------------------------------------------------------------

    def _pick(self) -> _Worker:
        live = [w for w in self.workers if w.live]
        if not live:
            raise Unavailable(
                f"API {self.api.name!r} has no handler worker running (one is being replaced)"
            )
        if sum(w.inflight for w in live) >= self.limit:
            raise ResourceExhausted(
                f"API {self.api.name!r} has {self.limit} calls in flight (gateway.max_inflight)"
            )
        return min(live, key=lambda w: w.inflight)

    def _metadata(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
        span: tracing.Client | None = None,
    ) -> tuple[tuple[str, str | bytes], ...]:
        """The caller's metadata and the request id; with tracing on, the handler call's trace
        context in place of the caller's."""
        skipped = self._skipped if span is None else self._skipped_traced
        passed = tuple(
            (k, v)
            for k, v in context.invocation_metadata() or ()
            if not k.startswith(_DROPPED) and k not in skipped
        )
        if span is not None:
            passed += span.headers
        return (*passed, ("x-request-id", call.request_id))

    def _span(self, method: str, call: Call, worker: _Worker) -> tracing.Client:
        """The handler call's span (tracing on), a child of the call's own."""
        traced = tracing.active()
        assert traced is not None
        service, _, name = method[1:].rpartition("/")
        attributes = {"modelmux.api": self.api.name, "modelmux.handler_worker": worker.index}
        return traced.client(service, name, call.span, attributes)

    def _error(self, exc: grpc.aio.AioRpcError, limit: float, call: Call) -> GatewayError:
        code = exc.code()
        if any(k == "x-modelmux-handler" for k, _ in exc.trailing_metadata() or ()):
            return Status(code, exc.details() or code.name)  # the worker's own status
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Status(
                code,
                f"the handler of API {self.api.name!r} did not answer within {limit:g} s "
                f"(the caller's deadline or gateway.handler_timeout; request id {call.request_id})",
            )
        if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (exc.details() or ""):
            # the call never reached a worker (it has just died): safe to retry
            return Unavailable(
                f"API {self.api.name!r}: the handler worker is being replaced; the call did not "
                "run, retry it"
            )
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            # gRPC's own status between gateway and worker (e.g. a message over the size limit)
            return Status(code, exc.details() or code.name)
        return self._lost(call)

    def _lost(self, call: Call) -> GatewayError:
        return Status(
            grpc.StatusCode.INTERNAL,
            f"the handler worker of API {self.api.name!r} was lost while handling the call "
            f"(request id {call.request_id}); it is being replaced",
        )

    async def unary(
        self,
        method: str,
        data: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
        *,
        client_streaming: bool = False,
    ) -> bytes:
        worker = self._pick()
        call.model, call.backend = self.api.name, f"handler-{worker.index}"
        limit = remaining(context, self.timeout)
        span = None if call.span is None else self._span(method, call, worker)
        code = grpc.StatusCode.OK
        worker.inflight += 1
        started = time.perf_counter()
        try:
            assert worker.channel is not None
            send: Any = (
                worker.channel.stream_unary(method)
                if client_streaming
                else worker.channel.unary_unary(method)
            )
            metadata = self._metadata(context, call, span)
            reply: bytes = await send(data, timeout=limit, metadata=metadata)
            return reply
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise self._error(exc, limit, call) from None
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            if _cancelling():  # the caller cancelled or its deadline passed
                raise
            raise self._lost(call) from None  # the worker's channel was closed under the call
        finally:
            worker.inflight -= 1
            if span is not None:
                span.end(code)
            HANDLER_SECONDS.labels(self.api.name, code.name).observe(time.perf_counter() - started)

    @property
    def live(self) -> bool:
        return any(w.live for w in self.workers)

    async def handle_async(
        self,
        body: bytes,
        *,
        request_id: str,
        content_type: str,
        timeout: float,
        trace: tracing.Metadata = (),
    ) -> inference_pb2.InvokeResponse:
        """Runs one async request on the worker with the fewest calls (``trace``: the trace
        context the worker's span continues). :class:`HandlerFailed` when the handler raised (or
        the call timed out), :class:`WorkerLost` when the worker died under it or none was
        running."""
        try:
            worker = self._pick()
        except GatewayError as exc:
            raise WorkerLost(exc.message) from None
        worker.inflight += 1
        try:
            assert worker.channel is not None
            call: Any = worker.channel.unary_unary(HANDLE_ASYNC)
            metadata = (("x-request-id", request_id), (CONTENT_TYPE_KEY, content_type), *trace)
            reply: bytes = await call(body, timeout=timeout, metadata=metadata)
            return inference_pb2.InvokeResponse.FromString(reply)
        except grpc.aio.AioRpcError as exc:
            marked = any(k == "x-modelmux-handler" for k, _ in exc.trailing_metadata() or ())
            if marked:
                raise HandlerFailed(exc.details() or exc.code().name) from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise HandlerFailed(
                    f"handle_async did not return within async.timeout ({timeout:g} s)"
                ) from None
            raise WorkerLost(
                f"the handler worker was lost while it ran the request ({exc.code().name})"
            ) from None
        except asyncio.CancelledError:
            if _cancelling():  # the gateway is stopping
                raise
            raise WorkerLost("the handler worker was lost while it ran the request") from None
        finally:
            worker.inflight -= 1

    async def streaming(
        self,
        method: str,
        data: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
        *,
        client_streaming: bool,
    ) -> AsyncIterator[bytes]:
        worker = self._pick()
        call.model, call.backend = self.api.name, f"handler-{worker.index}"
        limit = remaining(context, self.timeout)
        worker.inflight += 1
        try:
            assert worker.channel is not None
            open_call: Any = (
                worker.channel.stream_stream(method)
                if client_streaming
                else worker.channel.unary_stream(method)
            )
            async for item in open_call(
                data, timeout=limit, metadata=self._metadata(context, call)
            ):
                yield item
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, limit, call) from None
        except asyncio.CancelledError:
            if _cancelling():  # the caller cancelled or its deadline passed
                raise
            raise self._lost(call) from None
        finally:
            worker.inflight -= 1


def _cancelling() -> bool:
    """True when this task itself is being cancelled (the server does that when the caller cancels
    or its deadline passes), False when only the call to the worker was (its channel closed)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _exit(code: int) -> str:
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


class Handlers:
    """Every API's handler pool, the Invoke RPC, and the APIs' own services."""

    def __init__(
        self,
        config: Config,
        runtime_dir: str,
        taken: set[str],
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.gateway = f"unix:{os.path.join(runtime_dir, 'gateway.sock')}"
        self.pools: dict[str, HandlerPool] = {}
        # full service name -> (pool, descriptor) for the APIs' own services
        self.services: dict[str, tuple[HandlerPool, ServiceDescriptor]] = {}
        snapshot = ""
        for number, api in enumerate(config.apis):
            if not api.handler_path or api.kind == "BatchAPI":  # batch workers run per job
                continue
            key = f"apis[{number}]"
            if not snapshot:  # workers get the config as loaded, not the file as it is later
                snapshot = os.path.join(runtime_dir, "config.pickle")
                with open(snapshot, "wb") as fh:
                    pickle.dump(config, fh)
            pool = HandlerPool(
                config, api, number, runtime_dir, self.gateway, snapshot, env=dict(env or {})
            )
            if api.protobuf_path:
                key = f"{key}.handler.protobuf_path"
                try:
                    data = userproto.compile_proto(api.protobuf_path)
                    file = userproto.load(data, api.protobuf_path)
                except userproto.ProtoError as exc:
                    raise ConfigError(config.file, key, str(exc)) from None
                descriptors = os.path.join(runtime_dir, f"h{number}.pb")
                with open(descriptors, "wb") as fh:
                    fh.write(data)
                pool.descriptors = descriptors
                for service in userproto.services(file):
                    if service.full_name in taken or service.full_name in self.services:
                        raise ConfigError(
                            config.file, key, f"service {service.full_name} is already served"
                        )
                    self.services[service.full_name] = (pool, service)
            self.pools[api.name] = pool

    async def start(self) -> None:
        """All pools at once; the first failure stops the others and is raised."""
        results = await asyncio.gather(
            *(p.start() for p in self.pools.values()), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.close()
            raise failures[0]

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()))

    async def invoke(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        api = parse(inference_pb2.InvokeRequest, data).api
        if not api:
            raise InvalidArgument("api is required")
        pool = self.pools.get(api)
        if pool is not None and pool.api.kind != "RealtimeAPI":
            raise FailedPrecondition(
                f"API {api!r} is an {pool.api.kind}: submit to it with modelmux.v1.Async/Submit"
            )
        if pool is None:
            other = next((a for a in self.config.apis if a.name == api), None)
            if other is not None and other.kind == "BatchAPI" and other.handler_path:
                raise FailedPrecondition(
                    f"API {api!r} is a BatchAPI: submit jobs to it with modelmux.v1.Jobs/SubmitJob"
                )
            if other is not None:
                raise FailedPrecondition(
                    f"API {api!r} has no handler (handler.path): call Predict for its models"
                )
            raise NotFound(
                f"no API named {shown(api)} (APIs with handlers: {', '.join(self.pools) or 'none'})"
            )
        return await pool.unary(INVOKE, data, context, call)

    def method_handlers(
        self, wrap: Callable[[str, Any], Any], wrap_stream: Callable[[str, Any], Any]
    ) -> list[grpc.GenericRpcHandler]:
        """gRPC handlers forwarding each RPC of the APIs' own services to their workers."""
        out = []
        for name, (pool, service) in self.services.items():
            methods = {}
            for method in service.methods:
                path = f"/{name}/{method.name}"
                methods[method.name] = _forwarder(pool, path, method, wrap, wrap_stream)
            out.append(grpc.method_handlers_generic_handler(name, methods))
        return out


def _forwarder(
    pool: HandlerPool,
    path: str,
    method: Any,
    wrap: Callable[[str, Any], Any],
    wrap_stream: Callable[[str, Any], Any],
) -> grpc.RpcMethodHandler[Any, Any]:
    """One RPC's forwarding handler; bound to its own method path (no late binding)."""
    rpc = path[1:]
    request_cls = message_factory.GetMessageClass(method.input_type)

    def checked(data: Any) -> Any:
        """A single request is refused here with INVALID_ARGUMENT when it does not parse; the
        worker parses each message of a client stream (gateway/handlers/worker.py)."""
        if not method.client_streaming:
            parse(request_cls, data)
        return data

    if not method.server_streaming:

        async def unary(data: Any, context: Any, call: Call) -> bytes:
            return await pool.unary(
                path, checked(data), context, call, client_streaming=method.client_streaming
            )

        make = (
            grpc.stream_unary_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make(wrap(rpc, unary))

    def stream(data: Any, context: Any, call: Call) -> AsyncIterator[bytes]:
        return pool.streaming(
            path, checked(data), context, call, client_streaming=method.client_streaming
        )

    make = (
        grpc.stream_stream_rpc_method_handler
        if method.client_streaming
        else grpc.unary_stream_rpc_method_handler
    )
    return make(wrap_stream(rpc, stream))

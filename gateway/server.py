"""``modelmux gateway``: builds the gRPC server and the fleet of backends, and runs until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import grpc
import structlog
import uvloop

from gateway.admission import Admission
from gateway.api.facade import MODEL_SERVICE, PREDICTION_SERVICE, Facade
from gateway.api.inference import Inference
from gateway.api.models import Models
from gateway.asyncapi.service import SERVICE as ASYNC_SERVICE
from gateway.asyncapi.service import AsyncApis
from gateway.auth import HANDLER_SECRET_ENV, Authorizer
from gateway.batchapi.service import SERVICE as JOBS_SERVICE
from gateway.batchapi.service import BatchApis
from gateway.batching import Batching, Policy
from gateway.catalog import expected_models, gpu_apis, static_catalog
from gateway.edge import Call, Handler, Lifecycle, edge, stream_edge
from gateway.fleet.discovery import Discovery
from gateway.fleet.fleet import Fleet
from gateway.follower import Follower
from gateway.forwarding import Forwarder
from gateway.handlers.pool import Handlers, HandlerStartError
from gateway.metrics import RequestMetrics, note_table
from gateway.request import Send
from gateway.routing import SETTLED, Table
from gateway.transport import FORWARDED_METHODS
from gateway.workers import supervise
from modelmux.v1 import inference_pb2, models_pb2
from modelmux_common import logs, tracing
from modelmux_common.config import Config, load
from modelmux_common.grpcutil import (
    NOT_SERVING,
    SERVING,
    add_health_and_reflection,
    bind,
    message_size_options,
    reuse_freed_memory,
    run_until_signal,
)
from modelmux_common.listen import ListenError, server_options
from modelmux_common.metrics import MULTIPROC_ENV, Endpoint, multiprocess
from modelmux_common.quiesce import close_listeners_and_connections
from modelmux_common.security import server_credentials

log = structlog.get_logger("modelmux.gateway")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
MODELS_SERVICE = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name
MODEL_HEALTH_PREFIX = "modelmux.v1.Model/"
MODELSYNC_HEALTH = "modelmux.modelsync.v1.ModelSync"
BUILTIN_SERVICES = frozenset(
    {
        INFERENCE_SERVICE,
        MODELS_SERVICE,
        PREDICTION_SERVICE,
        MODEL_SERVICE,
        ASYNC_SERVICE,
        JOBS_SERVICE,
    }
)
# Of gateway.shutdown_grace, what stop() keeps for closing connections once calls have drained
QUIESCE_SECONDS = 0.5


class Gateway:
    """The gateway's gRPC server and everything it serves."""

    def __init__(
        self, config: Config, *, manage_backends: bool = True, strict: bool = False
    ) -> None:
        self.config = config
        # --strict: SERVING only once every model is routable, and start-up fails (start_failed
        # is set) when one settles as not servable
        self.strict = strict
        self.start_failed = asyncio.Event()
        self._settled_once = False
        gw = config.gateway
        # handler workers' own calls carry this secret (gateway/auth.py); one per start
        handler_secret = secrets.token_urlsafe(32)
        self.lifecycle = Lifecycle(handler_secret)
        self.auth = Authorizer(gw.auth, from_handler=self.lifecycle.from_handler)
        self.fleet = _fleet(config, manage=manage_backends and gw.manage_backends)
        self.discovery = Discovery(self.fleet, config.backends, interval=gw.dns_refresh)
        self.follower = _follower(config, self.fleet)
        apis = frozenset(api.name for api in config.apis)
        self.request_metrics = (
            RequestMetrics(lambda name: name in self.fleet.table.known or name in apis)
            if gw.metrics_listen
            else None
        )
        self.admission = _request_path(config, self.fleet, self.request_metrics)
        self.models_api = Models(
            self.fleet,
            self.admission,
            backend_max_inflight=gw.backend_max_inflight,
            admin_token=gw.admin_token,
        )
        self.runtime_dir = _runtime_dir(config)
        # handler workers write their metrics_client's metrics here (modelmux_common/metrics.py);
        # a --workers N gateway's worker has the supervisor's folder, which it writes itself
        self.metrics_dir = os.environ.get(MULTIPROC_ENV, "") if multiprocess() else ""
        if not self.metrics_dir and self.runtime_dir:
            self.metrics_dir = os.path.join(self.runtime_dir, "metrics")
        metrics_env = (
            {MULTIPROC_ENV: self.metrics_dir} if gw.metrics_listen and self.runtime_dir else {}
        )
        workers_env = {**metrics_env, HANDLER_SECRET_ENV: handler_secret}
        self.metrics: Endpoint | None = None
        try:
            self.handlers = Handlers(
                config, self.runtime_dir, set(BUILTIN_SERVICES), env=workers_env
            )
        except BaseException:
            self._remove_runtime_dir()
            raise
        self.handlers_ready = not self.handlers.pools
        # async APIs (gateway/asyncapi/): their queues and runners start with the handlers
        self.asyncapi = AsyncApis(config, self.handlers)
        # batch APIs (gateway/batchapi/): their jobs' workers reach this gateway as handlers do,
        # with the handlers' secret (their Predict calls need no token)
        self.batchapi = BatchApis(
            config, runtime_dir=self.runtime_dir, gateway=self.handlers.gateway, env=workers_env
        )
        self.server = grpc.aio.server(
            options=[
                *message_size_options(gw.max_message_bytes),
                *server_options(shared_port=gw.workers > 1),  # only `--workers N` share a port
            ]
        )
        # every RPC behind the edge; the API modules call the request path below them
        self._register(
            Facade(self.fleet, self.admission.send), Inference(self.fleet, self.admission.send)
        )
        self.health = add_health_and_reflection(
            self.server, [*sorted(BUILTIN_SERVICES), *self.handlers.services]
        )
        self._health: dict[str, int] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.address = ""
        self.bound: list[str] = []  # what start() bound: the addresses stop() closes
        # composed: from now on every new routing table reaches health and the watchers
        self.fleet.on_change = self._on_table
        if self.follower is not None:
            self.follower.on_connection = lambda _: self._on_table(self.fleet.table)

    def _register(self, facade: Facade, inference: Inference) -> None:
        """Every RPC behind the edge, as registered methods: gRPC matches the path in C, no
        Python lookup per call."""
        gw, models, handlers = self.config.gateway, self.models_api, self.handlers
        metrics = self.request_metrics
        guard = self.auth.guard

        def wrap_unary(rpc: str, fn: Handler, api: str = "invoke") -> Any:
            """``api``: whose bearer tokens (gateway.auth) it takes; "" for none."""
            return edge(
                rpc,
                fn,
                log_requests=gw.log_requests,
                lifecycle=self.lifecycle,
                guard=guard(api) if api else None,
                metrics=metrics.route(rpc) if metrics is not None else None,
            )

        def wrap(service: str, method: str, fn: Handler, api: str = "") -> Any:
            return grpc.unary_unary_rpc_method_handler(wrap_unary(f"{service}/{method}", fn, api))

        def predict(service: str, method: str, fn: Handler) -> Any:
            return wrap(service, method, fn, "predict")

        services: dict[str, dict[str, Any]] = {
            INFERENCE_SERVICE: {
                "Predict": predict(INFERENCE_SERVICE, "Predict", inference.predict),
                "Invoke": wrap(INFERENCE_SERVICE, "Invoke", handlers.invoke, "invoke"),
            },
            MODELS_SERVICE: {
                "ListModels": wrap(MODELS_SERVICE, "ListModels", models.list_models),
                "GetModel": wrap(MODELS_SERVICE, "GetModel", models.get_model),
                "SetVersionLabel": wrap(
                    MODELS_SERVICE, "SetVersionLabel", models.set_version_label
                ),
                "SetTrafficSplit": wrap(
                    MODELS_SERVICE, "SetTrafficSplit", models.set_traffic_split
                ),
                "WatchModels": grpc.unary_stream_rpc_method_handler(
                    stream_edge(models.watch_models, lifecycle=self.lifecycle)
                ),
            },
            PREDICTION_SERVICE: {
                m: predict(PREDICTION_SERVICE, m, facade.forwarding(m)) for m in FORWARDED_METHODS
            },
            MODEL_SERVICE: {
                "GetModelStatus": predict(MODEL_SERVICE, "GetModelStatus", facade.get_model_status),
                "HandleReloadConfigRequest": predict(
                    MODEL_SERVICE, "HandleReloadConfigRequest", facade.reload_config
                ),
            },
        }
        for service, methods in services.items():
            self.server.add_registered_method_handlers(service, methods)

        asyncapi = self.asyncapi
        self.server.add_registered_method_handlers(
            ASYNC_SERVICE,
            {
                **{
                    name: wrap(ASYNC_SERVICE, name, getattr(asyncapi, name.lower()), "async")
                    for name in ("Submit", "Get", "Cancel", "List")
                },
                "Watch": grpc.unary_stream_rpc_method_handler(
                    stream_edge(asyncapi.watch, lifecycle=self.lifecycle, guard=guard("async"))
                ),
            },
        )

        batchapi = self.batchapi
        self.server.add_registered_method_handlers(
            JOBS_SERVICE,
            {
                **{
                    name: wrap(JOBS_SERVICE, name, getattr(batchapi, name.lower()), "jobs")
                    for name in ("SubmitJob", "GetJob", "ListJobs", "StopJob", "ListFailedBatches")
                },
                "WatchJob": grpc.unary_stream_rpc_method_handler(
                    stream_edge(batchapi.watchjob, lifecycle=self.lifecycle, guard=guard("jobs"))
                ),
            },
        )

        def wrap_stream(rpc: str, fn: Any) -> Any:
            return stream_edge(
                lambda r, c: fn(r, c, Call(c)), lifecycle=self.lifecycle, guard=guard("invoke")
            )

        self.server.add_generic_rpc_handlers(handlers.method_handlers(wrap_unary, wrap_stream))

    def _on_table(self, table: Table) -> None:
        """Health: one entry per model (SERVING while it is routable), modelsync's link, and
        overall SERVING once nothing is left to wait for: handlers started, the first snapshot
        arrived (following modelsync), and every model is routable or known not to be servable
        for a reported reason (refused, failed to load, no backend for it, its source failing).
        With --strict, every model must be routable."""
        wanted: dict[str, int] = {
            name: NOT_SERVING for name in self._health if name.startswith(MODEL_HEALTH_PREFIX)
        }
        for name in table.known:
            wanted[MODEL_HEALTH_PREFIX + name] = SERVING if name in table.routes else NOT_SERVING
        settled = self.handlers_ready and all(
            name in table.routes or getattr(table.states.get(name), "state", "") in SETTLED
            for name in table.known
        )
        if self.follower is not None:
            settled = settled and self.follower.synced.is_set()
            wanted[MODELSYNC_HEALTH] = SERVING if self.follower.connected else NOT_SERVING
        unservable = sorted(name for name in table.known if name not in table.routes)
        note_table(table, self.fleet.reports())
        if settled and not self._settled_once:
            self._settled_once = True
            self._report_start(table, unservable)
        ready = settled and not (self.strict and unservable)
        wanted[""] = SERVING if ready else NOT_SERVING
        self.models_api.publish(table)
        changed = {k: v for k, v in wanted.items() if self._health.get(k) != v}
        if not changed:
            return
        self._health.update(changed)
        for name, status in changed.items():
            log.info(
                "health",
                service=name or "<overall>",
                status="SERVING" if status == SERVING else "NOT_SERVING",
            )
        previous = self._health_task
        self._health_task = asyncio.get_running_loop().create_task(
            self._set_health(changed, previous)
        )

    def _inflight(self) -> list[tuple[str, int]]:
        """The in-flight counts of the request path, by limit (the gauge's sample)."""
        backends = [(f"backend:{r.name}", r.endpoint.outstanding) for r in self.fleet.reports()]
        return [("gateway.max_inflight", self.admission.inflight), *backends]

    def _report_start(self, table: Table, unservable: list[str]) -> None:
        """One line when start-up settles, listing every model that cannot be served and why;
        with --strict that ends start-up."""
        if not unservable:
            return
        models = [
            {
                "model": name,
                "api": self.fleet.desired.api_of(name),
                "state": getattr(table.states.get(name), "state", ""),
                "reason": getattr(table.states.get(name), "reason", ""),
            }
            for name in unservable
        ]
        if self.strict:
            log.error(
                "start_failed", reason="--strict: some models cannot be served", models=models
            )
            self.start_failed.set()
        else:
            log.warning("models_not_servable", count=len(models), models=models)

    async def _set_health(
        self, changed: Mapping[str, int], previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            await previous  # keep updates in order
        for name, status in changed.items():
            await self.health.set(name, status)

    async def start(self) -> str:
        gw = self.config.gateway
        # the supervisor of a --workers N gateway serves /metrics from the workers' files
        if gw.metrics_listen and not multiprocess():
            try:
                self.metrics = Endpoint(
                    gw.metrics_listen, self.metrics_dir, key="gateway.metrics_listen"
                )
            except ListenError:
                self._remove_runtime_dir()
                raise
            log.info("metrics", address=gw.metrics_listen, port=self.metrics.port)
        try:
            shared = self.config.gateway.workers > 1
            tls = server_credentials(self.config.gateway.tls, what="gateway")
            self.address = bind(
                self.server, self.config.gateway.listen, shared_port=shared, credentials=tls
            )
            self.bound = [self.address]
            if self.handlers.pools or self.batchapi.names:  # tensorflow_client reaches it here
                self.bound.append(bind(self.server, self.handlers.gateway))
        except ListenError:
            self._remove_runtime_dir()
            raise
        self._on_table(self.fleet.table)
        await self.server.start()
        try:
            await self.handlers.start()
        except BaseException:
            await self.server.stop(0)
            self._remove_runtime_dir()
            raise
        await self.asyncapi.start()
        await self.batchapi.start()
        self.handlers_ready = True
        self._on_table(self.fleet.table)  # nothing else may change: handler-only gateways
        self.fleet.start()
        if self.request_metrics is not None:
            self._sampler = asyncio.create_task(self.request_metrics.sample(self._inflight))
        await self.discovery.refresh()
        self.discovery.start()
        if self.follower is not None:
            self.follower.start()
        log.info(
            "serving", address=self.address, backends=[b.address for b in self.config.backends]
        )
        return self.address

    async def stop(self, force: bool = False) -> None:
        """Health NOT_SERVING; new calls get UNAVAILABLE while accepted ones finish; then the
        listeners close and the connections end after the replies sent on them, before the gRPC
        server stops, so that grpc has no call left to cancel (modelmux_common/quiesce.py). All
        of it within gateway.shutdown_grace; a forced stop cancels what runs at once."""
        grace = self.config.gateway.shutdown_grace
        await self.health.enter_graceful_shutdown()
        drained = force or await self.lifecycle.drained(max(0.0, grace - QUIESCE_SECONDS))
        if not force:
            await close_listeners_and_connections(self.bound, timeout=min(grace, QUIESCE_SECONDS))
        await self.server.stop(0)
        if self.follower is not None:
            await self.follower.close()
        await self.asyncapi.close()
        await self.batchapi.close()
        if self.metrics is not None:
            self.metrics.close()
        await self.handlers.close()
        await self.discovery.close()
        if self._sampler is not None:
            self._sampler.cancel()
        await self.fleet.close()
        self._remove_runtime_dir()
        log.info("stopped", forced=force, drained=drained)

    def _remove_runtime_dir(self) -> None:
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


def _fleet(config: Config, *, manage: bool) -> Fleet:
    """The backends, with the models the config names (path sources) or none until modelsync
    publishes them."""
    gw = config.gateway
    return Fleet(
        config=gw,
        backends=config.backends,
        models={} if gw.modelsync else static_catalog(config),
        labels=config.version_labels,
        manage=manage,
        expected=expected_models(config),
    )


def _follower(config: Config, fleet: Fleet) -> Follower | None:
    """modelsync's event stream into the fleet's desired state (None: static models)."""
    if not config.gateway.modelsync:
        return None
    python_apis = frozenset(a.name for a in config.apis if a.handler_type == "python")
    return Follower(
        config.gateway.modelsync,
        fleet.update,
        gpu_apis=gpu_apis(config),
        skip_apis=python_apis,
        on_problems=fleet.set_problems,
        tls=config.gateway.modelsync_tls,
    )


def _request_path(config: Config, fleet: Fleet, metrics: RequestMetrics | None) -> Admission:
    """The layers below the API modules, top to bottom: admission (gateway.max_inflight),
    server-side batching for the APIs that ask for it, forwarding."""
    gw = config.gateway
    forwarder = Forwarder(
        timeout=gw.backend_timeout, backend_max_inflight=gw.backend_max_inflight, metrics=metrics
    )
    policies = {
        api.name: Policy(api.max_batch_size, api.batch_interval)
        for api in config.apis
        if api.max_batch_size
    }
    send: Send = forwarder.send
    if policies:
        send = Batching(send, policies, max_bytes=gw.max_message_bytes, tables=fleet).send
    return Admission(send, max_inflight=gw.max_inflight, metrics=metrics)


def _runtime_dir(config: Config) -> str:
    """Handler workers' sockets, compiled user protos and disk model caches ("": no handlers)."""
    gw = config.gateway
    if not any(api.handler_path for api in config.apis):
        return ""
    if not gw.runtime_dir:
        return tempfile.mkdtemp(prefix="modelmux-")
    _remove_stale(gw.runtime_dir)
    path = os.path.join(gw.runtime_dir, f"gateway-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    return path


def _remove_stale(runtime_dir: str) -> None:
    """Removes the runtime folders of gateways that are gone (killed before they cleaned up)."""
    try:
        entries = os.listdir(runtime_dir)
    except FileNotFoundError:
        return
    for name in entries:
        pid = name.removeprefix("gateway-")
        if name.startswith("gateway-") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(runtime_dir, name), ignore_errors=True)


async def serve(config: Config, *, manage_backends: bool = True, strict: bool = False) -> None:
    gateway = Gateway(config, manage_backends=manage_backends, strict=strict)
    signals = asyncio.create_task(run_until_signal(start=gateway.start, stop=gateway.stop))
    failed = asyncio.create_task(gateway.start_failed.wait())  # only ever set with --strict
    await asyncio.wait({signals, failed}, return_when=asyncio.FIRST_COMPLETED)
    if not failed.done():
        failed.cancel()
        try:
            await signals
        except HandlerStartError as exc:
            log.error("start_failed", error=str(exc))
            raise SystemExit(1) from None
        return
    signals.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await signals
    await gateway.stop()
    raise SystemExit(1)


def main(args: argparse.Namespace) -> int:
    flags = {"listen": args.listen or None, "workers": args.workers}
    config = load(args.config, daemon="gateway", overrides={"gateway": flags})
    logs.configure(level=config.gateway.log_level, component="gateway")
    index = args.worker_index
    if index is None and config.gateway.workers > 1:
        return supervise(config, args, config.gateway.workers)
    if index is not None:
        structlog.contextvars.bind_contextvars(worker=index)
    if config.gateway.reuse_freed_memory:
        reuse_freed_memory(4 * config.gateway.max_message_bytes)
    try:  # before the server is built: its edge decides once whether calls are traced
        tracing.setup(configured=config.gateway.tracing, service="modelmux-gateway")
    except tracing.TracingError as exc:
        log.error("start_failed", error=str(exc))
        return 2
    # uvloop: the event loop in C; a forwarded call costs about an eighth less CPU than on
    # asyncio's own loop (docs/benchmarks.md)
    try:
        uvloop.run(serve(config, manage_backends=not index, strict=getattr(args, "strict", False)))
    finally:
        tracing.shutdown()  # exports the spans still buffered
    return 0

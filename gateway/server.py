"""``modelmux gateway``: builds the gRPC server, the backend pool, and runs until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import grpc
import structlog
import uvloop

from gateway.asyncapi.service import SERVICE as ASYNC_SERVICE
from gateway.asyncapi.service import AsyncApis
from gateway.batching import Policy
from gateway.calls import Call, Forwarder, Handler, Lifecycle, edge, stream_edge
from gateway.catalog import expected_models, gpu_apis, static_catalog
from gateway.discovery import Discovery
from gateway.facade import MODEL_SERVICE, PREDICTION_SERVICE, Facade
from gateway.follower import Follower
from gateway.handlers.pool import Handlers, HandlerStartError
from gateway.inference import Inference
from gateway.models_api import Models
from gateway.pool import FORWARDED_METHODS, Pool
from gateway.routing import SETTLED, Table
from gateway.workers import supervise
from modelmux.v1 import inference_pb2, models_pb2
from modelmux_common import logs
from modelmux_common.config import Config, ConfigError, load
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
from modelmux_common.metrics import MULTIPROC_ENV, Endpoint
from modelmux_common.quiesce import close_listeners_and_connections

log = structlog.get_logger("modelmux.gateway")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
MODELS_SERVICE = models_pb2.DESCRIPTOR.services_by_name["Models"].full_name
MODEL_HEALTH_PREFIX = "modelmux.v1.Model/"
MODELSYNC_HEALTH = "modelmux.modelsync.v1.ModelSync"
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
        for i, api in enumerate(config.apis):
            if api.handler_type == "python" and api.sources and not gw.modelsync:
                raise ConfigError(
                    config.file,
                    f"apis[{i}].handler.multi_model_reloading",
                    "python handlers' models come through modelsync: set gateway.modelsync",
                )
        self.lifecycle = Lifecycle()
        self.follower: Follower | None = None
        # models the config names (path / paths) for the backends: listed and waited for
        self.pool = Pool(
            config=gw,
            backends=config.backends,
            models={} if gw.modelsync else static_catalog(config),
            labels=config.version_labels,
            on_change=self._on_table,
            manage=manage_backends and gw.manage_backends,
            expected=expected_models(config),
        )
        self.discovery = Discovery(self.pool, config.backends, interval=gw.dns_refresh)
        if gw.modelsync:
            python_apis = frozenset(a.name for a in config.apis if a.handler_type == "python")
            self.follower = Follower(
                gw.modelsync,
                self.pool.update,
                gpu_apis=gpu_apis(config),
                skip_apis=python_apis,
                on_problems=self.pool.set_problems,
            )
            self.follower.on_connection = lambda _: self._on_table(self.pool.table)
        self.server = grpc.aio.server(
            options=[
                *message_size_options(gw.max_message_bytes),
                *server_options(shared_port=gw.workers > 1),  # only `--workers N` share a port
            ]
        )
        self.forwarder = forwarder = Forwarder(
            self.pool,
            timeout=gw.backend_timeout,
            max_inflight=gw.max_inflight,
            backend_max_inflight=gw.backend_max_inflight,
        )
        policies = {
            api.name: Policy(api.max_batch_size, api.batch_interval)
            for api in config.apis
            if api.max_batch_size
        }
        if policies:
            forwarder.batch(policies, gw.max_message_bytes)
        facade = Facade(self.pool, forwarder)
        inference = Inference(forwarder)
        self.models_api = models = Models(self.pool, forwarder, admin_token=gw.admin_token)

        # handler workers' sockets, compiled user protos and disk model caches
        self.runtime_dir = ""
        if any(api.handler_path for api in config.apis):
            if gw.runtime_dir:
                _remove_stale(gw.runtime_dir)
                self.runtime_dir = os.path.join(gw.runtime_dir, f"gateway-{os.getpid()}")
                os.makedirs(self.runtime_dir, exist_ok=True)
            else:
                self.runtime_dir = tempfile.mkdtemp(prefix="modelmux-")
        builtin = {
            INFERENCE_SERVICE,
            MODELS_SERVICE,
            PREDICTION_SERVICE,
            MODEL_SERVICE,
            ASYNC_SERVICE,
        }
        # handler workers write their metrics_client's metrics here (modelmux_common/metrics.py)
        self.metrics_dir = os.path.join(self.runtime_dir, "metrics") if self.runtime_dir else ""
        metrics_env = (
            {MULTIPROC_ENV: self.metrics_dir} if gw.metrics_listen and self.runtime_dir else {}
        )
        self.metrics: Endpoint | None = None
        try:
            self.handlers = handlers = Handlers(config, self.runtime_dir, builtin, env=metrics_env)
        except BaseException:
            self._remove_runtime_dir()
            raise
        self.handlers_ready = not handlers.pools

        def wrap(service: str, method: str, fn: Handler) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                edge(
                    f"{service}/{method}",
                    fn,
                    log_requests=gw.log_requests,
                    lifecycle=self.lifecycle,
                )
            )

        prediction = {
            m: wrap(PREDICTION_SERVICE, m, facade.forwarding(m)) for m in FORWARDED_METHODS
        }
        # registered methods: gRPC matches the path in C, no Python lookup per call
        for service, methods in (
            (
                INFERENCE_SERVICE,
                {
                    "Predict": wrap(INFERENCE_SERVICE, "Predict", inference.predict),
                    "Invoke": wrap(INFERENCE_SERVICE, "Invoke", handlers.invoke),
                },
            ),
            (
                MODELS_SERVICE,
                {
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
            ),
            (PREDICTION_SERVICE, prediction),
            (
                MODEL_SERVICE,
                {
                    "GetModelStatus": wrap(
                        MODEL_SERVICE, "GetModelStatus", facade.get_model_status
                    ),
                    "HandleReloadConfigRequest": wrap(
                        MODEL_SERVICE, "HandleReloadConfigRequest", facade.reload_config
                    ),
                },
            ),
        ):
            self.server.add_registered_method_handlers(service, methods)

        # async APIs (gateway/asyncapi/): their queues and runners start with the handlers
        self.asyncapi = asyncapi = AsyncApis(config, handlers)
        self.server.add_registered_method_handlers(
            ASYNC_SERVICE,
            {
                **{
                    name: wrap(ASYNC_SERVICE, name, getattr(asyncapi, name.lower()))
                    for name in ("Submit", "Get", "Cancel", "List")
                },
                "Watch": grpc.unary_stream_rpc_method_handler(
                    stream_edge(asyncapi.watch, lifecycle=self.lifecycle)
                ),
            },
        )

        def wrap_unary(rpc: str, fn: Handler) -> Any:
            return edge(rpc, fn, log_requests=gw.log_requests, lifecycle=self.lifecycle)

        def wrap_stream(rpc: str, fn: Any) -> Any:
            return stream_edge(lambda r, c: fn(r, c, Call(c)), lifecycle=self.lifecycle)

        self.server.add_generic_rpc_handlers(handlers.method_handlers(wrap_unary, wrap_stream))
        self.health = add_health_and_reflection(self.server, [*sorted(builtin), *handlers.services])
        self._health: dict[str, int] = {}
        self._health_task: asyncio.Task[None] | None = None
        self.address = ""
        self.bound: list[str] = []  # what start() bound: the addresses stop() closes

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
        if settled and not self._settled_once:
            self._settled_once = True
            self._report_start(table, unservable)
        ready = settled and not (self.strict and unservable)
        wanted[""] = SERVING if ready else NOT_SERVING
        if hasattr(self, "models_api"):
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

    def _report_start(self, table: Table, unservable: list[str]) -> None:
        """One line when start-up settles, listing every model that cannot be served and why;
        with --strict that ends start-up."""
        if not unservable:
            return
        models = [
            {
                "model": name,
                "api": self.pool.api_of(name),
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
        try:
            shared = self.config.gateway.workers > 1
            self.address = bind(self.server, self.config.gateway.listen, shared_port=shared)
            self.bound = [self.address]
            if self.handlers.pools:  # tensorflow_client reaches the gateway here
                self.bound.append(bind(self.server, self.handlers.gateway))
        except ListenError:
            self._remove_runtime_dir()
            raise
        self._on_table(self.pool.table)
        await self.server.start()
        try:
            await self.handlers.start()
        except BaseException:
            await self.server.stop(0)
            self._remove_runtime_dir()
            raise
        await self.asyncapi.start()
        if self.config.gateway.metrics_listen:
            self.metrics = Endpoint(self.config.gateway.metrics_listen, self.metrics_dir)
            log.info("metrics", address=self.config.gateway.metrics_listen, port=self.metrics.port)
        self.handlers_ready = True
        self._on_table(self.pool.table)  # nothing else may change: handler-only gateways
        self.pool.start()
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
        if self.metrics is not None:
            self.metrics.close()
        await self.handlers.close()
        await self.discovery.close()
        await self.pool.close()
        self._remove_runtime_dir()
        log.info("stopped", forced=force, drained=drained)

    def _remove_runtime_dir(self) -> None:
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


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
    config = load(args.config)
    if args.listen:
        config = dataclasses.replace(
            config, gateway=dataclasses.replace(config.gateway, listen=args.listen)
        )
    if args.workers:
        config = dataclasses.replace(
            config, gateway=dataclasses.replace(config.gateway, workers=args.workers)
        )
    logs.configure(level=config.gateway.log_level, component="gateway")
    index = args.worker_index
    if index is None and config.gateway.workers > 1:
        return supervise(config, args, config.gateway.workers)
    if index is not None:
        structlog.contextvars.bind_contextvars(worker=index)
    if config.gateway.reuse_freed_memory:
        reuse_freed_memory(4 * config.gateway.max_message_bytes)
    # uvloop: the event loop in C; a forwarded call costs about an eighth less CPU than on
    # asyncio's own loop (docs/benchmarks.md)
    uvloop.run(serve(config, manage_backends=not index, strict=getattr(args, "strict", False)))
    return 0

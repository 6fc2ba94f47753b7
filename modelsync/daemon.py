"""``modelmux sync``: the modelsync daemon (gRPC server + sync loops), or one pass with --once."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os

import grpc
import structlog
from grpc_health.v1._async import HealthServicer

from modelmux.modelsync.v1 import modelsync_pb2_grpc as pb_grpc
from modelmux_common import logs
from modelmux_common.config import Config, ModelsyncConfig, load
from modelmux_common.grpcutil import (
    NOT_SERVING,
    SERVING,
    add_health_and_reflection,
    bind,
    parsing,
    run_until_signal,
)
from modelmux_common.listen import server_options
from modelmux_common.metrics import Endpoint
from modelmux_common.security import server_credentials
from modelsync.publisher import SourceSpec
from modelsync.service import SERVICE_NAME, ModelSyncService
from modelsync.state import StateError
from modelsync.syncer import Syncer

log = structlog.get_logger("modelsync")

# How long open streams and calls may finish after SIGTERM.
SHUTDOWN_GRACE = 2.0


def health_name(spec: SourceSpec) -> str:
    """The grpc.health.v1 service name of one source."""
    return f"source/{spec.id}"


class Daemon:
    """The gRPC server and the syncer. Overall health is SERVING while the server runs, even when
    sources fail (the last good mirror is still served); each source has its own health entry."""

    def __init__(self, config: Config, settings: ModelsyncConfig) -> None:
        self.settings = settings
        self.syncer = Syncer(config, settings, on_health=self._source_health)
        self.server: grpc.aio.Server | None = None
        self.health: HealthServicer | None = None
        self.address = ""
        self.metrics: Endpoint | None = None
        self._stopped = False

    async def start(self) -> str:
        """Loads state, starts serving (logs ``serving``), then starts syncing."""
        server = grpc.aio.server(options=server_options())
        pb_grpc.add_ModelSyncServicer_to_server(ModelSyncService(self.syncer), parsing(server))
        self.health = add_health_and_reflection(server, [SERVICE_NAME])
        # a busy address fails here, before the state is loaded or the target touched
        tls = server_credentials(self.settings.tls, what="modelsync")
        self.address = bind(server, self.settings.listen, credentials=tls)
        if self.settings.metrics_listen:
            self.metrics = Endpoint(self.settings.metrics_listen, key="modelsync.metrics_listen")
            log.info("metrics", address=self.settings.metrics_listen, port=self.metrics.port)
        self.syncer.open()
        await server.start()
        self.server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, SERVING)
        for spec in self.syncer.specs:
            await self.health.set(health_name(spec), NOT_SERVING)
        log.info(
            "serving",
            address=self.address,
            target=self.settings.target,
            sources=list(dict.fromkeys(spec.uri for spec in self.syncer.specs)),  # shared once
            revision=self.syncer.events.revision,
        )
        await self.syncer.start()
        return self.address

    async def _source_health(self, spec: SourceSpec, healthy: bool) -> None:
        if self.health is not None:
            await self.health.set(health_name(spec), SERVING if healthy else NOT_SERVING)

    async def stop(self, force: bool = False) -> None:
        """Health NOT_SERVING, stop syncing (transfers are abandoned), end streams, stop serving."""
        if self._stopped:
            return
        self._stopped = True
        if self.metrics is not None:
            self.metrics.close()
        if self.server is None:  # start() failed before serving: nothing to drain or announce
            await self.syncer.stop()
            return
        log.info("stopping", forced=force)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        await self.syncer.stop()
        await self.server.stop(0 if force else SHUTDOWN_GRACE)
        log.info("stopped")


def settings_from(config: Config, args: argparse.Namespace) -> ModelsyncConfig:
    """The config's modelsync section with the command-line flags applied over it."""
    base = config.modelsync
    listen = getattr(args, "listen", None) or base.listen
    target = getattr(args, "target", None)
    return dataclasses.replace(
        base, listen=listen, target=os.path.abspath(target) if target else base.target
    )


async def serve(config: Config, settings: ModelsyncConfig) -> int:
    daemon = Daemon(config, settings)

    async def start() -> None:
        try:
            await daemon.start()
        except BaseException:
            await daemon.stop(force=True)
            raise

    await run_until_signal(start=start, stop=daemon.stop)
    return 0


async def sync_once(config: Config, settings: ModelsyncConfig) -> int:
    """Mirrors every source once and exits: 0 when all succeeded and every configured model has a
    valid version published, 1 when a source failed, 3 when a model ended with none (each is
    listed with the reasons, in one ``nothing_published`` line)."""
    syncer = Syncer(config, settings)
    syncer.open()
    try:
        ok = await syncer.sync_once()
    finally:
        await syncer.stop()
    failed = [r.spec.id for r in syncer.runners if r.health.healthy is False]
    missing = unpublished(syncer)
    log.info(
        "sync_once_done",
        ok=ok,
        failed_sources=failed,
        published=len(syncer.publisher.published),
        revision=syncer.events.revision,
    )
    if missing:
        log.error("nothing_published", count=len(missing), models=missing)
    return 1 if not ok else 3 if missing else 0


def unpublished(syncer: Syncer) -> list[dict[str, object]]:
    """Configured models with no version published: those a path source names, those a source
    refused outright, and dir sources that publish no model at all; each with its reasons."""
    published = {name for name, _ in syncer.publisher.published}
    out: list[dict[str, object]] = []
    for runner in sorted(syncer.runners, key=lambda r: r.spec.id):
        spec = runner.spec
        reasons: dict[str, list[str]] = {}
        for problem in sorted(runner.health.reported, key=lambda p: (p.model, p.reason)):
            if problem.model and problem.model not in published:
                where = "" if problem.version is None else f"version {problem.version}: "
                reasons.setdefault(problem.model, []).append(where + problem.reason)
        if spec.model is not None and spec.model not in published:
            reasons.setdefault(spec.model, [])
        if not reasons and spec.model is None and not syncer.publisher.of_source(spec.id):
            reasons[""] = [runner.health.error or "the dir source holds no model folder"]
        for model, why in sorted(reasons.items()):
            why = why or [runner.health.error or "no valid version at the source"]
            out.append({"model": model, "api": spec.api, "source": spec.uri, "reasons": why})
    return out


def main(args: argparse.Namespace) -> int:
    config = load(args.config)
    settings = settings_from(config, args)
    logs.configure(level=settings.log_level, component="modelsync")
    try:
        if getattr(args, "once", False):
            return asyncio.run(sync_once(config, settings))
        return asyncio.run(serve(config, settings))
    except StateError as exc:
        log.error("state_unusable", reason=str(exc), hint="move the state file away to start over")
        return 2
    except OSError as exc:  # cannot listen, or the target is not writable
        log.error("cannot_start", reason=str(exc), target=settings.target, listen=settings.listen)
        return 1

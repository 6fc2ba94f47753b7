"""Everything modelsync does except gRPC: sources, runners, the store, state, events, cleanup."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import structlog

from modelmux_common.config import Config, ModelsyncConfig
from modelsync import state as state_file
from modelsync.events import EventLog
from modelsync.publisher import Publisher, SourceSpec
from modelsync.runner import HealthHook, SourceRunner, wait_any
from modelsync.s3 import S3Source, settings_client
from modelsync.sources import LocalSource, Source
from modelsync.state import State
from modelsync.store import Store
from modelsync.transfer import Transfers, TransferSettings
from modelsync.watch import FolderWatch

log = structlog.get_logger("modelsync")

# Longest sleep of the cleanup loop when nothing is due (it is woken when something is retired).
_GC_IDLE = 60.0
# With --once, how many more ticks a source gets while versions are still being uploaded.
_SETTLE_ROUNDS = 30


def source_specs(config: Config) -> list[SourceSpec]:
    return [
        SourceSpec(
            id=f"{s.api}/{s.name}" if s.kind == "path" else f"{s.api}/*",
            api=s.api,
            model=s.name if s.kind == "path" else None,
            uri=s.uri,
            inferentia=s.inferentia,
            savedmodel=s.savedmodel,
        )
        for s in config.sources()
    ]


async def _ignore_health(spec: SourceSpec, healthy: bool) -> None:
    return None


class Syncer:
    """Call :meth:`open` (inside the event loop), then :meth:`start` or :meth:`sync_once`."""

    def __init__(
        self, config: Config, settings: ModelsyncConfig, *, on_health: HealthHook | None = None
    ) -> None:
        self.settings = settings
        self.specs = source_specs(config)
        self.store = Store(Path(settings.target))
        self.transfers = Transfers(
            TransferSettings(
                concurrency=settings.download_concurrency,
                max_bytes_in_flight=settings.max_bytes_in_flight,
                attempts=settings.download_attempts,
                progress_interval=settings.progress_interval,
            )
        )
        self._on_health = on_health or _ignore_health
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._s3: Any = None
        self.runners: list[SourceRunner] = []
        self.events = EventLog(capacity=settings.event_log_size, revision=0)
        self.publisher = Publisher(self.store, State(), self.events, grace=settings.removal_grace)

    def open(self) -> None:
        """Loads the state and repairs the tree after whatever stopped the last run."""
        litter = self.store.prepare()
        saved = state_file.load(self.store.state_path)
        for key, p in list(saved.published.items()):
            if not self.store.path(p.store).is_dir():
                log.error("store_folder_missing", model=p.model, version=p.version, path=p.store)
                del saved.published[key]
        keep = {p.store_base for p in saved.published.values()} | {r.path for r in saved.pending}
        orphans = self.store.orphans(keep)
        for rel in orphans:
            self.store.delete(rel)
        views = {
            (r.model, r.version): r.view_target
            for r in saved.pending
            if r.version is not None and self.store.path(r.view_target).is_dir()
        }
        views.update({k: p.store for k, p in saved.published.items()})
        repaired = self.store.reconcile(views)
        self.events = EventLog(capacity=self.settings.event_log_size, revision=saved.revision)
        self.publisher = Publisher(
            self.store, saved, self.events, grace=self.settings.removal_grace
        )
        self.runners = [self._runner(spec, saved) for spec in self.specs]
        log.info(
            "state_loaded",
            target=str(self.store.target),
            revision=saved.revision,
            published=len(saved.published),
            staging_litter_removed=litter,
            orphans_removed=len(orphans),
            links_repaired=len(repaired),
        )

    def _runner(self, spec: SourceSpec, saved: State) -> SourceRunner:
        source: Source
        if spec.uri.startswith("s3://"):
            stall = self.settings.stall_timeout
            source = S3Source(spec.uri, client=self._s3_client(), stall_timeout=stall)
        else:
            local = LocalSource(spec.uri, abort=self.transfers.abort)
            local.prime(
                {
                    rec.key: rec.info
                    for p in saved.published.values()
                    if p.source_id == spec.id
                    for rec in p.files.values()
                }
            )
            source = local
        runner = SourceRunner(
            spec,
            source,
            publisher=self.publisher,
            transfers=self.transfers,
            on_health=self._on_health,
            settle=self.settings.settle,
        )
        if isinstance(source, LocalSource):
            runner.watch = FolderWatch(source.root, runner.wake)
        return runner

    def _s3_client(self) -> Any:
        if self._s3 is None:
            self._s3 = settings_client(self.settings, pool=self.settings.download_concurrency + 4)
        return self._s3

    async def start(self) -> None:
        await self._drop_unconfigured()
        for runner in self.runners:
            task = runner.run(
                stop=self._stop,
                poll_interval=self.settings.poll_interval,
                debounce=self.settings.debounce,
            )
            self._tasks.append(asyncio.create_task(task, name=f"sync {runner.spec.id}"))
        self._tasks.append(asyncio.create_task(self._collect_garbage(), name="store cleanup"))

    async def sync_once(self) -> bool:
        """One tick of every source; True when all of them succeeded."""
        await self._drop_unconfigured()
        results = await asyncio.gather(*(self._tick_settled(r) for r in self.runners))
        await self.publisher.collect_garbage()
        return all(results)

    @staticmethod
    async def _tick_settled(runner: SourceRunner) -> bool:
        """Ticks until no version of the source is still settling (an upload in progress)."""
        ok = await runner.tick()
        for _ in range(_SETTLE_ROUNDS):
            if runner.settle_wait is None:
                break
            await asyncio.sleep(runner.settle_wait)
            ok = await runner.tick()
        return ok

    async def stop(self) -> None:
        """Stops watching and syncing; transfers in flight are abandoned (staging is cleared at
        the next start), published content is untouched."""
        self._stop.set()
        self.transfers.abort.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for runner in self.runners:
            if runner.watch is not None:
                await asyncio.to_thread(runner.watch.stop)
        if self._s3 is not None:
            self._s3.close()
        self.events.close()

    async def _drop_unconfigured(self) -> None:
        configured = {spec.id for spec in self.specs}
        for p in list(self.publisher.published.values()):
            if p.source_id not in configured:
                await self.publisher.remove(
                    p, reason=f"source {p.source_id!r} is no longer configured"
                )

    async def _collect_garbage(self) -> None:
        wake = self.publisher.gc_wake
        while not self._stop.is_set():
            wake.clear()
            due = await self.publisher.collect_garbage()
            wait = _GC_IDLE if due is None else min(_GC_IDLE, max(0.0, due - time.time()) + 0.01)
            await wait_any((self._stop, wake), wait)

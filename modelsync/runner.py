"""The sync loop of one source: list, plan, remove, fetch and publish, report.

One tick lists the source once. Versions that changed are fetched into staging concurrently (the
shared :class:`~modelsync.transfer.Transfers` bounds the whole daemon), verified and published;
versions gone from the source are removed. Problems are reported once, when they appear or change,
not on every tick (VALIDATION_FAILED), and once more when they go (VALIDATION_CLEARED); a path
source that holds no file is refused too, so that what it names is never silently missing. A failing source keeps its last good mirror, is reported once (SOURCE_ERROR),
and is reported again when it works (SOURCE_RECOVERED).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from modelsync import metrics
from modelsync.events import EventKind
from modelsync.layout import Problem, group
from modelsync.plan import Change, Plan, make_plan
from modelsync.publisher import OwnershipConflict, Publisher, SourceSpec
from modelsync.sources import Source, SourceChanged, SourceError
from modelsync.store import ViewOccupied
from modelsync.threads import run_blocking
from modelsync.transfer import Transfers
from modelsync.watch import FolderWatch

log = structlog.get_logger("modelsync.runner")

HealthHook = Callable[[SourceSpec, bool], Awaitable[None]]


@dataclass(slots=True)
class SourceHealth:
    # None until the first tick ends.
    healthy: bool | None = None
    error: str = ""
    last_success: float | None = None
    ticks: int = 0
    # Problems seen on the last tick -> revision of the VALIDATION_FAILED that reported it: each is
    # reported once, when it appears, and cleared once, when it goes.
    reported: dict[Problem, int] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()


class SourceRunner:
    def __init__(
        self,
        spec: SourceSpec,
        source: Source,
        *,
        publisher: Publisher,
        transfers: Transfers,
        on_health: HealthHook,
        settle: float = 0.0,
    ) -> None:
        self.spec = spec
        self.settle = settle
        # Seconds until a settling version is old enough to be judged; None when none is waiting.
        self.settle_wait: float | None = None
        self.source = source
        self.publisher = publisher
        self.transfers = transfers
        self.health = SourceHealth()
        self.wake = asyncio.Event()
        self.watch: FolderWatch | None = None
        self._on_health = on_health

    async def run(self, *, stop: asyncio.Event, poll_interval: float, debounce: float) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as exc:  # the loop must survive a bug in one tick
                log.exception("tick_crashed", source=self.spec.id)
                await self._failed(f"internal error: {exc}")
            await self._next_trigger(stop, poll_interval, debounce)

    async def _next_trigger(self, stop: asyncio.Event, interval: float, debounce: float) -> None:
        """Returns after ``interval`` (sooner when a version is settling), or once a watched change
        has been quiet for ``debounce``."""
        if self.settle_wait is not None:
            interval = min(interval, self.settle_wait)
        if not await wait_any((stop, self.wake), interval) or stop.is_set():
            return
        while True:
            self.wake.clear()
            if not await wait_any((stop, self.wake), debounce) or stop.is_set():
                return

    async def tick(self) -> bool:
        """One pass; True when the listing and every transfer succeeded."""
        started = time.monotonic()
        ok = False
        try:
            ok = await self._tick()
        finally:
            self.health.ticks += 1
            metrics.SYNC_SECONDS.labels(self.spec.id).observe(time.monotonic() - started)
            if not ok:
                metrics.ERRORS.labels(self.spec.id).inc()
        log.debug("tick", source=self.spec.id, ok=ok, seconds=round(time.monotonic() - started, 3))
        return ok

    async def _tick(self) -> bool:
        try:
            listing = await run_blocking(self.source.list, name="modelsync-list")
        except SourceError as exc:
            await self._failed(str(exc))
            return False
        if self.watch is not None:
            self.watch.start()
        grouping = group(listing.objects, model=self.spec.model)
        young_after = listing.now - self.settle if listing.now and self.settle > 0 else None
        plan = make_plan(
            grouping,
            published=self.publisher.of_source(self.spec.id),
            inferentia=self.spec.inferentia,
            savedmodel=self.spec.savedmodel,
            owner=self.publisher.owner,
            source_id=self.spec.id,
            young_after=young_after,
        )
        self._note_settling(plan, young_after)
        self._note_ignored(grouping.ignored)
        model = self.spec.model
        if model and not grouping.candidates and all(p.model != model for p in plan.rejected):
            reason = f"nothing to publish: the source {self.spec.uri} holds no files"
            plan.rejected.append(Problem(model, None, reason))
        for old in plan.remove:
            await self.publisher.remove(old, reason="removed at the source")
        errors = await self._apply_all(plan)
        await self._report(plan.rejected)
        if errors:
            await self._failed(errors[0])
            return False
        await self._succeeded()
        return True

    async def _apply_all(self, plan: Plan) -> list[str]:
        results = await asyncio.gather(
            *(self._apply(change) for change in plan.publish), return_exceptions=True
        )
        errors: list[str] = []
        for change, result in zip(plan.publish, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, OwnershipConflict | ViewOccupied):
                cand = change.candidate
                plan.rejected.append(Problem(cand.model, cand.version, str(result)))
            elif isinstance(result, SourceError):
                errors.append(str(result))
            elif isinstance(result, BaseException):
                log.error("publish_failed", source=self.spec.id, exc_info=result)
                errors.append(f"publishing failed: {result}")
        return errors

    async def _apply(self, change: Change) -> None:
        cand = change.candidate
        staged = self.publisher.store.new_staging(cand.model, cand.version)
        started = time.monotonic()
        try:
            stats = await self.transfers.fetch_version(
                self.source, cand, staged, reuse=self._reusable(change)
            )
            event = await self.publisher.publish(
                cand=cand, spec=self.spec, staged=staged, kind=change.kind, reason=change.reason
            )
        except SourceChanged as exc:
            log.info(
                "source_changed_during_fetch",
                model=cand.model,
                version=cand.version,
                reason=str(exc),
            )
            self.wake.set()
            return
        finally:
            if staged.exists():
                await asyncio.to_thread(self.publisher.store.discard, staged)
        metrics.DOWNLOADED.labels(self.spec.id).inc(stats.downloaded_bytes)
        metrics.PUBLISHED.labels(self.spec.id).inc()
        log.info(
            "published",
            kind=change.kind.value,
            model=cand.model,
            version=cand.version,
            revision=event.revision,
            files=stats.files,
            bytes=cand.total_bytes,
            downloaded_bytes=stats.downloaded_bytes,
            reused_files=stats.reused_files,
            seconds=round(time.monotonic() - started, 3),
            digest=event.digest,
            reason=change.reason,
        )

    def _reusable(self, change: Change) -> dict[str, Path]:
        """Files of the previous content with the same path, size and ETag: hard-linked, not fetched."""
        old = change.previous
        if old is None:
            return {}
        base = self.publisher.store.path(old.store)
        return {
            path: base.joinpath(*path.split("/"))
            for path, info in change.candidate.files.items()
            if path in old.files
            and (old.files[path].size, old.files[path].etag) == (info.size, info.etag)
        }

    async def _report(self, problems: list[Problem]) -> None:
        current = set(problems)
        reported = self.health.reported
        for p in sorted(set(reported) - current, key=_problem_order):
            log.info(
                "validation_cleared",
                source=self.spec.id,
                model=p.model,
                version=p.version,
                reason=p.reason,
            )
            await self.publisher.note(
                EventKind.VALIDATION_CLEARED,
                spec=self.spec,
                reason=p.reason,
                model=p.model,
                version=p.version,
            )
            del reported[p]
        for p in sorted(current - set(reported), key=_problem_order):
            log.warning(
                "validation_failed",
                source=self.spec.id,
                model=p.model,
                version=p.version,
                reason=p.reason,
            )
            event = await self.publisher.note(
                EventKind.VALIDATION_FAILED,
                spec=self.spec,
                reason=p.reason,
                model=p.model,
                version=p.version,
            )
            reported[p] = event.revision

    def _note_settling(self, plan: Plan, young_after: float | None) -> None:
        if not plan.settling or young_after is None:
            self.settle_wait = None
            return
        newest = max(c.modified for c in plan.settling)
        self.settle_wait = max(0.05, newest - young_after + 0.05)
        log.debug(
            "versions_settling",
            source=self.spec.id,
            versions=[f"{c.model}/{c.version}" for c in plan.settling],
            seconds=round(self.settle_wait, 2),
        )

    def _note_ignored(self, ignored: list[str]) -> None:
        keys = frozenset(ignored)
        if keys and keys != self.health.ignored:
            log.info(
                "keys_ignored",
                source=self.spec.id,
                keys=sorted(keys)[:20],
                count=len(keys),
                reason="outside any model version folder",
            )
        self.health.ignored = keys

    async def _failed(self, reason: str) -> None:
        was = self.health.healthy
        self.health.healthy = False
        self.health.error = reason
        if was is not False:
            log.error("source_failed", source=self.spec.id, uri=self.spec.uri, reason=reason)
            await self._on_health(self.spec, False)
            await self.publisher.note(EventKind.SOURCE_ERROR, spec=self.spec, reason=reason)

    async def _succeeded(self) -> None:
        was = self.health.healthy
        self.health.healthy = True
        self.health.error = ""
        self.health.last_success = time.time()
        metrics.LAST_SUCCESS.labels(self.spec.id).set(self.health.last_success)
        if was is not True:
            await self._on_health(self.spec, True)
        if was is False:
            log.info("source_recovered", source=self.spec.id, uri=self.spec.uri)
            await self.publisher.note(
                EventKind.SOURCE_RECOVERED, spec=self.spec, reason="the source works again"
            )


def _problem_order(p: Problem) -> tuple[str, int, str]:
    return (p.model, -1 if p.version is None else p.version, p.reason)


async def wait_any(events: tuple[asyncio.Event, ...], timeout: float) -> bool:
    """Waits until one of ``events`` is set; False on timeout."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return bool(done)

"""The single writer of the target tree and the state: every change becomes exactly one event.

Order of a publish: rename the verified staging folder into the store, record it in the state
(with the event's revision) and save the state, swap the view symlink, then announce the event.
A crash before the state is saved leaves an orphan store folder (deleted at the next start) and
the old view; a crash after it leaves a state the next start restores the view from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from modelsync.events import Event, EventKind, EventLog
from modelsync.layout import Candidate
from modelsync.state import FileRecord, PendingRemoval, Published, State, save
from modelsync.store import Store

log = structlog.get_logger("modelsync.publisher")


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One configured source, as the rest of modelsync sees it."""

    # "<api>/<model>" for a path source, "<api>/*" for a dir source.
    id: str
    api: str
    # The model name of a path source; None for a dir source.
    model: str | None
    uri: str
    inferentia: bool
    # False for a python handler's models: a version may hold any files (no layout check).
    savedmodel: bool = True


class OwnershipConflict(Exception):
    """Another source already publishes a model of that name."""


class Publisher:
    def __init__(self, store: Store, state: State, events: EventLog, *, grace: float) -> None:
        self.store = store
        self.state = state
        self.events = events
        self.grace = grace
        self.gc_wake = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def published(self) -> Mapping[tuple[str, int], Published]:
        return self.state.published

    def owner(self, model: str) -> str | None:
        for (name, _), p in self.state.published.items():
            if name == model:
                return p.source_id
        return None

    def of_source(self, source_id: str) -> dict[tuple[str, int], Published]:
        return {k: p for k, p in self.state.published.items() if p.source_id == source_id}

    async def publish(
        self, *, cand: Candidate, spec: SourceSpec, staged: Path, kind: EventKind, reason: str
    ) -> Event:
        async with self._lock:
            other = self.owner(cand.model)
            if other is not None and other != spec.id:
                raise OwnershipConflict(f"model {cand.model!r} is published from {other!r}")
            self.store.check_view(cand.model, cand.version)
            revision = self.state.revision + 1
            rel = Store.store_rel(cand.model, revision, cand.version)
            await asyncio.to_thread(self.store.commit, staged, rel)
            key = (cand.model, cand.version)
            previous = self.state.published.get(key)
            record = Published(
                model=cand.model,
                version=cand.version,
                api=spec.api,
                inferentia=spec.inferentia,
                source_id=spec.id,
                source_uri=spec.uri,
                revision=revision,
                digest=cand.digest,
                store=rel,
                files={
                    path: FileRecord(cand.key(path), info.size, info.etag, info.mtime_ns)
                    for path, info in cand.files.items()
                },
                published_at=time.time(),
            )
            self.state.published[key] = record
            if previous is not None:
                self._retire(previous)
            event = self._event(kind, revision, record, reason=reason, previous=previous)
            await self._save(revision)
            self.store.point(cand.model, cand.version, rel)
            self.events.append(event)
            return event

    async def remove(self, old: Published, *, reason: str) -> list[Event]:
        """Unpublishes a version. Its view link and store folder stay for the grace period, so a
        backend is not pulled from under while subscribers stop using the version."""
        async with self._lock:
            self.state.published.pop((old.model, old.version), None)
            self._retire(old, with_view=True)
            revision = self.state.revision + 1
            events = [self._event(EventKind.VERSION_REMOVED, revision, old, reason=reason)]
            if self.owner(old.model) is None:
                events.append(
                    Event(
                        revision=revision + 1,
                        kind=EventKind.MODEL_REMOVED,
                        time=time.time(),
                        model=old.model,
                        api=old.api,
                        inferentia=old.inferentia,
                        reason=f"last version removed ({reason})",
                        source=old.source_uri,
                    )
                )
            await self._save(events[-1].revision)
            for event in events:
                self.events.append(event)
            return events

    async def note(
        self,
        kind: EventKind,
        *,
        spec: SourceSpec,
        reason: str,
        model: str = "",
        version: int | None = None,
    ) -> Event:
        """An event that changes nothing on disk: a rejected version, a source failing or back."""
        async with self._lock:
            event = Event(
                revision=self.state.revision + 1,
                kind=kind,
                time=time.time(),
                model=model,
                version=version,
                api=spec.api,
                inferentia=spec.inferentia,
                reason=reason,
                source=spec.uri,
            )
            await self._save(event.revision)
            self.events.append(event)
            return event

    async def collect_garbage(self) -> float | None:
        """Deletes store folders whose grace period is over; returns the next due time, if any."""
        async with self._lock:
            now = time.time()
            due = [r for r in self.state.pending if r.due <= now]
            if due:
                for removal in due:
                    if removal.version is not None:
                        self.store.unpoint(removal.model, removal.version, removal.view_target)
                    await asyncio.to_thread(self.store.delete, removal.path)
                    log.info("store_folder_deleted", path=removal.path)
                self.state.pending = [r for r in self.state.pending if r.due > now]
                await self._save(self.state.revision)
            return min((r.due for r in self.state.pending), default=None)

    def _retire(self, old: Published, *, with_view: bool = False) -> None:
        due = time.time() + self.grace
        if with_view:
            removal = PendingRemoval(old.store_base, due, old.model, old.version)
        else:
            removal = PendingRemoval(old.store_base, due)
        self.state.pending.append(removal)
        self.gc_wake.set()

    async def _save(self, revision: int) -> None:
        self.state.revision = revision
        await asyncio.to_thread(save, self.store.state_path, self.state)

    def _event(
        self,
        kind: EventKind,
        revision: int,
        p: Published,
        *,
        reason: str,
        previous: Published | None = None,
    ) -> Event:
        return Event(
            revision=revision,
            kind=kind,
            time=time.time(),
            model=p.model,
            version=p.version,
            api=p.api,
            inferentia=p.inferentia,
            digest=p.digest,
            reason=reason,
            store_path=str(self.store.path(p.store)),
            store_base_path=str(self.store.path(p.store_base)),
            previous_store_path=str(self.store.path(previous.store)) if previous else "",
            source=p.source_uri,
            files=len(p.files),
            bytes=p.bytes,
        )

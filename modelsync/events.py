"""Events, the bounded in-memory log that WatchEvents resumes from, and subscriptions."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass


class EventKind(enum.Enum):
    VERSION_ADDED = "VERSION_ADDED"
    VERSION_REMOVED = "VERSION_REMOVED"
    MODEL_REMOVED = "MODEL_REMOVED"
    STRUCTURE_CHANGED = "STRUCTURE_CHANGED"
    CONTENT_UPDATED = "CONTENT_UPDATED"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    SOURCE_ERROR = "SOURCE_ERROR"
    SOURCE_RECOVERED = "SOURCE_RECOVERED"
    VALIDATION_CLEARED = "VALIDATION_CLEARED"


@dataclass(frozen=True, slots=True)
class Event:
    """One change. Paths are absolute; see the ``Event`` message of modelsync.proto."""

    revision: int
    kind: EventKind
    time: float
    model: str = ""
    version: int | None = None
    api: str = ""
    inferentia: bool = False
    digest: str = ""
    reason: str = ""
    store_path: str = ""
    store_base_path: str = ""
    previous_store_path: str = ""
    source: str = ""
    files: int = 0
    bytes: int = 0


class Subscription:
    """Live events for one subscriber, bounded: a subscriber that falls behind is cut off.

    Iterating yields queued events; it stops when the subscription is closed or, after the queued
    events, when it overflowed (``lagged``): the subscriber resumes from the last revision it saw.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: deque[Event] = deque()
        self._wake = asyncio.Event()
        self.lagged = False
        self.closed = False

    def push(self, event: Event) -> None:
        if self.closed or self.lagged:
            return
        if len(self._items) >= self._limit:
            self.lagged = True
        else:
            self._items.append(event)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._items:
                return self._items.popleft()
            if self.closed or self.lagged:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()


class EventLog:
    """The last ``capacity`` events, covering the revisions (``base``, ``revision``]."""

    def __init__(self, *, capacity: int, revision: int) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._base = revision
        self._revision = revision
        self._subscribers: set[Subscription] = set()

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def base(self) -> int:
        return self._base

    def append(self, event: Event) -> None:
        if event.revision <= self._revision:
            raise ValueError(f"revision {event.revision} is not after {self._revision}")
        if self._events.maxlen is not None and len(self._events) == self._events.maxlen:
            self._base = self._events[0].revision
        self._events.append(event)
        self._revision = event.revision
        for sub in list(self._subscribers):
            sub.push(event)

    def retained(self) -> list[Event]:
        return list(self._events)

    def after(self, revision: int) -> list[Event] | None:
        """The events after ``revision``; None when they are not all retained (or it is ahead)."""
        if revision < self._base or revision > self._revision:
            return None
        return [e for e in self._events if e.revision > revision]

    def subscribe(self, *, limit: int) -> Subscription:
        sub = Subscription(limit)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        sub.close()

    def close(self) -> None:
        for sub in list(self._subscribers):
            self.unsubscribe(sub)

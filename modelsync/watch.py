"""Change notifications for local folders (watchdog), turned into a wake-up of the sync loop.

Debouncing happens in the loop (it waits for a quiet period); the periodic rescan stays the
fallback for whatever a watch misses (network filesystems, a folder replaced wholesale).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = structlog.get_logger("modelsync.watch")

# Reading files (hashing, copying) must not look like a change.
_READS = {EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE}


class _Handler(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        self._loop = loop
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _READS:
            return
        # RuntimeError: the loop is closed during shutdown.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._wake.set)


class FolderWatch:
    """Sets ``wake`` whenever something under ``root`` changes. Started from the event loop."""

    def __init__(self, root: Path, wake: asyncio.Event) -> None:
        self.root = root
        self._wake = wake
        self._observer: BaseObserver | None = None

    @property
    def active(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def start(self) -> bool:
        """Starts watching; False when it cannot (e.g. the folder is missing): polling still runs."""
        if self.active:
            return True
        self.stop()
        observer = Observer()
        try:
            handler = _Handler(asyncio.get_running_loop(), self._wake)
            observer.schedule(handler, str(self.root), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("watch_unavailable", folder=str(self.root), reason=str(exc))
            return False
        self._observer = observer
        return True

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=5)

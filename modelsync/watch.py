"""Change notifications for local folders (watchdog), turned into a wake-up of the sync loop.

Debouncing happens in the loop (it waits for a quiet period); the periodic rescan stays the
fallback for whatever a watch misses (network filesystems, a folder replaced wholesale).

watchdog runs three kinds of threads per watch: the inotify reader, the emitter and the observer
(dispatch). An exception in any of them ends that thread and live watching stops without a sign:
the other threads carry on, idle. So every thread here ends quietly instead (keeping the error),
and the sync loop calls ``FolderWatch.start`` after each rescan, which replaces a watch that lost a
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import CallbackId, InotifyFD, Mask, WatchCallback, WatchDescriptor

log = structlog.get_logger("modelsync.watch")

# Reading files (hashing, copying) must not look like a change.
_READS = {EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE}


class _Guarded(threading.Thread):
    """A watchdog thread whose exception ends it quietly; ``error`` keeps it for the restart log."""

    error: Exception | None = None

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self.error = exc


class _InotifyFD(_Guarded, InotifyFD):
    def _add_callback(
        self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
    ) -> WatchDescriptor:
        # inotify hands back the watch it already has when a folder is added twice: one created
        # while its parent was being walked (its create event arrives after the walk), or one
        # moved out of the tree and back. watchdog warns about that (RuntimeWarning, which kills
        # this thread under -W error); re-registering the same callback is harmless.
        watch = self._get_or_create_watch(path, mask)
        watch.callbacks[id_] = callback
        return watch.wd


class _WatchGroup(InotifyWatchGroup):
    def _remove_watch_internally(self, wd: WatchDescriptor) -> None:
        # A folder moved out of the tree keeps its watch, filed under its old path. When a new
        # folder took that path and is removed first, removing the old watch then finds the
        # path's entry gone (a KeyError in watchdog's version).
        path = self._active_callbacks_by_watch.pop(wd, None)
        if path is not None and self._active_callbacks_by_path.get(path) == wd:
            del self._active_callbacks_by_path[path]


class _Emitter(_Guarded, InotifyEmitter):
    def on_thread_start(self) -> None:  # watchdog's, with the watch group above
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )


class _Observer(_Guarded, BaseObserver):
    """watchdog's InotifyObserver, built from the guarded threads above."""

    def __init__(self) -> None:
        self.inotify = _InotifyFD()
        self.inotify.start()
        super().__init__(_Emitter, inotify_fd=self.inotify)

    def threads(self) -> list[_Guarded]:
        return [self, self.inotify, *(e for e in self.emitters if isinstance(e, _Guarded))]

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self.inotify.stop()
        self.inotify.join()


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
        self._observer: _Observer | None = None

    def threads(self) -> list[_Guarded]:
        """The watchdog threads behind the watch (none when it is stopped)."""
        return self._observer.threads() if self._observer is not None else []

    @property
    def active(self) -> bool:
        threads = self.threads()
        return bool(threads) and all(t.is_alive() for t in threads)

    def start(self) -> bool:
        """Starts watching, or restarts a watch that lost a thread (the emitter also ends when the
        folder itself goes); False when it cannot (e.g. the folder is missing): polling still runs.
        """
        if self.active:
            return True
        dead = [t for t in self.threads() if not t.is_alive()]
        if dead:
            error = next((t.error for t in dead if t.error is not None), None)
            log.warning(
                "watch_restarted",
                folder=str(self.root),
                threads=[type(t).__name__.strip("_") for t in dead],
                reason=repr(error) if error is not None else "thread ended",
                exc_info=error,
            )
        self.stop()
        observer = _Observer()
        try:
            handler = _Handler(asyncio.get_running_loop(), self._wake)
            observer.schedule(handler, str(self.root), recursive=True)
            observer.start()
        except OSError as exc:
            observer.stop()  # the inotify reader thread is already running
            log.warning("watch_unavailable", folder=str(self.root), reason=str(exc))
            return False
        self._observer = observer
        return True

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        try:
            observer.stop()
        except Exception as exc:  # a broken watch must not fail the tick that replaces it
            log.warning("watch_stop_failed", folder=str(self.root), reason=repr(exc))
        if observer.is_alive():
            observer.join(timeout=5)

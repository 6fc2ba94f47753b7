"""Fetching one version into a staging folder.

Bounded at two levels: at most ``concurrency`` files move at once, and the summed sizes of the
objects in flight stay under ``max_bytes_in_flight`` (an object bigger than that waits until it is
alone). Memory per transfer is one chunk: bodies are streamed to disk. Each file is retried with
exponential backoff; a retry continues the partial file where the source allows it. Files the
previous content of the version already has (same path, size and ETag) are hard-linked from its
immutable store folder instead of downloaded.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from modelsync.layout import Candidate, ObjectInfo, hostile_reason
from modelsync.sources import Source, SourceError, Transfer
from modelsync.threads import run_blocking

log = structlog.get_logger("modelsync.transfer")


@dataclass(frozen=True, slots=True)
class TransferSettings:
    concurrency: int = 8
    max_bytes_in_flight: int = 512 * 1024 * 1024
    attempts: int = 4
    progress_interval: float = 5.0
    # First retry delay; doubles with each attempt, with jitter.
    backoff: float = 0.5


@dataclass(frozen=True, slots=True)
class FetchStats:
    files: int
    downloaded_files: int
    downloaded_bytes: int
    reused_files: int


class ByteBudget:
    """A counting limit on bytes in flight."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, size: int) -> int:
        want = max(1, min(size, self._limit))
        async with self._cond:
            await self._cond.wait_for(lambda: self._used + want <= self._limit)
            self._used += want
        return want

    async def release(self, granted: int) -> None:
        async with self._cond:
            self._used -= granted
            self._cond.notify_all()


class Progress:
    """Bytes received for one version; updated from transfer threads."""

    def __init__(self, total: int, on_bytes: Callable[[int], None] | None = None) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._on_bytes = on_bytes

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
        if self._on_bytes is not None:
            self._on_bytes(count)


def safe_join(root: Path, rel: str) -> Path:
    """``root/rel`` for a relative key already checked by :func:`hostile_reason`; re-checked."""
    reason = hostile_reason(rel)
    if reason:
        raise ValueError(f"refusing to write {rel!r}: {reason}")
    path = root.joinpath(*rel.split("/"))
    if root.resolve() not in path.resolve().parents:
        raise ValueError(f"refusing to write {rel!r} outside {root}")
    return path


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def link_or_copy(old: Path, dest: Path, size: int) -> bool:
    """Hard-links (or copies) an unchanged file from a store folder; False when it is unusable."""
    try:
        if old.stat().st_size != size:
            return False
        try:
            os.link(old, dest)
        except OSError:
            shutil.copyfile(old, dest)
    except OSError:
        return False
    return True


class Transfers:
    """Shared by every source, so the bounds hold for the whole daemon."""

    def __init__(self, settings: TransferSettings) -> None:
        self.settings = settings
        self.abort = threading.Event()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._budget = ByteBudget(settings.max_bytes_in_flight)
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.files_received = 0
        self.retries = 0

    def _count(self, count: int) -> None:
        with self._lock:
            self.bytes_received += count

    async def fetch_version(
        self, source: Source, cand: Candidate, staging: Path, *, reuse: Mapping[str, Path]
    ) -> FetchStats:
        """Fills ``staging`` with every file of ``cand``, verified. Raises on the first failure."""
        wanted: dict[str, tuple[ObjectInfo, Path]] = {}
        reused = 0
        for path, info in sorted(cand.files.items()):
            dest = safe_join(staging, path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            old = reuse.get(path)
            if old is not None and link_or_copy(old, dest, info.size):
                reused += 1
            else:
                wanted[path] = (info, dest)
        total = sum(info.size for info, _ in wanted.values())
        progress = Progress(total, self._count)
        reporter = asyncio.create_task(self._report(cand, progress))
        try:
            async with asyncio.TaskGroup() as group:
                for path, (info, dest) in wanted.items():
                    group.create_task(
                        self._fetch_file(source, cand.key(path), info, dest, progress)
                    )
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        finally:
            reporter.cancel()
        return FetchStats(len(cand.files), len(wanted), total, reused)

    async def _report(self, cand: Candidate, progress: Progress) -> None:
        while True:
            await asyncio.sleep(self.settings.progress_interval)
            elapsed = time.monotonic() - progress.started
            log.info(
                "transfer_progress",
                model=cand.model,
                version=cand.version,
                bytes_done=progress.done,
                bytes_total=progress.total,
                percent=round(100.0 * progress.done / max(1, progress.total), 1),
                mib_per_s=round(progress.done / max(elapsed, 1e-6) / 2**20, 2),
            )

    async def _fetch_file(
        self, source: Source, key: str, info: ObjectInfo, dest: Path, progress: Progress
    ) -> None:
        granted = await self._budget.acquire(info.size)
        try:
            async with self._slots:
                await self._attempts(source, key, info, dest, progress)
        finally:
            await self._budget.release(granted)

    async def _attempts(
        self, source: Source, key: str, info: ObjectInfo, dest: Path, progress: Progress
    ) -> None:
        attempts = self.settings.attempts
        for attempt in range(1, attempts + 1):
            transfer = Transfer(on_bytes=progress.add, abort=self.abort)
            fetch = functools.partial(source.fetch, key, info, dest, progress=transfer)
            try:
                await run_blocking(fetch, name="modelsync-fetch")
            except SourceError as exc:
                if attempt == attempts:
                    raise SourceError(f"{key}: {exc} (after {attempts} attempts)") from exc
                delay = self.settings.backoff * 2 ** (attempt - 1) * (0.5 + random.random())
                with self._lock:
                    self.retries += 1
                log.warning(
                    "transfer_retry",
                    key=key,
                    attempt=attempt,
                    reason=str(exc),
                    resume_from=_size(dest),
                    delay=round(delay, 2),
                )
                await asyncio.sleep(delay)
            else:
                with self._lock:
                    self.files_received += 1
                return

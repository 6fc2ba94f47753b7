"""``modelmux job ... --watch``: a job's progress as WatchJob reports it, until it ends.

On a terminal, a live bar (rich): batches done / total, batches per second, time left and
failures, in 80 columns. Elsewhere (a pipe, a file, CI) one plain line per change, at most one a second
besides status changes, so a log stays readable. Both end with one summary line.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import TextIO

from modelmux.client import Job

# the rate is measured over the last RATE_WINDOW seconds of progress
RATE_WINDOW = 30.0
PLAIN_EVERY = 1.0


class Rate:
    """Batches per second over a sliding window, and the time left at that rate."""

    def __init__(self, *, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done: int, now: float) -> None:
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def per_second(self, now: float) -> float | None:
        if len(self.samples) < 2:
            return None
        first_time, first_done = self.samples[0]
        elapsed = now - first_time
        return (self.samples[-1][1] - first_done) / elapsed if elapsed > 0 else None

    def eta(self, job: Job, now: float) -> float | None:
        """Seconds until every batch has ended at the current rate (None: not known yet)."""
        if job.done:
            return 0.0
        rate = self.per_second(now)
        if not job.total_batch_count or not rate:
            return None
        return max(0, job.total_batch_count - job.batches_done) / rate


def seconds_text(seconds: float | None) -> str:
    """``"-"``, ``"45s"``, ``"3m05s"``, ``"2h10m"``."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def rate_text(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}/s" if rate < 100 else f"{rate:.0f}/s"


def progress_line(job: Job, rate: Rate, now: float) -> str:
    total = str(job.total_batch_count) if job.total_batch_count else "?"
    return (
        f"job {job.job_id} {job.status}: {job.batches_done}/{total} batches, "
        f"{job.batches_failed} failed, {job.batches_in_flight} running, "
        f"{rate_text(rate.per_second(now))}, ETA {seconds_text(rate.eta(job, now))}"
    )


def summary(job: Job) -> list[str]:
    """What is said once the job has ended: its outcome, and where to look when it failed."""
    took = (
        f" in {seconds_text(job.end_time - job.start_time)}"
        if job.end_time is not None and job.start_time is not None
        else ""
    )
    lines = [
        f"job {job.job_id} {job.status}{took}: {job.batches_succeeded}/{job.total_batch_count} "
        f"batches succeeded, {job.batches_failed} failed; completion hook {job.completion_hook}"
    ]
    if job.error:
        lines.append(f"error: {job.error}")
    if job.hook_error:
        lines.append(f"completion hook error: {job.hook_error}")
    if job.batches_failed:
        lines.append(f"failed batches and their items: modelmux job failed {job.job_id}")
    return lines


def follow(updates: Iterable[Job], *, out: TextIO, tty: bool) -> Job | None:
    """Shows ``updates`` until they end; the last job seen (None when there was none)."""
    return _follow_bar(updates, out) if tty else _follow_plain(updates, out)


def _follow_plain(updates: Iterable[Job], out: TextIO) -> Job | None:
    rate, last, shown_at, shown_status = Rate(), None, 0.0, ""
    for job in updates:
        now = time.monotonic()
        rate.add(job.batches_done, now)
        last = job
        if job.status != shown_status or job.done or now - shown_at >= PLAIN_EVERY:
            print(progress_line(job, rate, now), file=out, flush=True)
            shown_at, shown_status = now, job.status
    return last


def _follow_bar(updates: Iterable[Job], out: TextIO) -> Job | None:
    # rich is imported here: no other command needs it, and it takes ~0.1 s to import
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn(),
        TextColumn(
            "batches · {task.fields[rate]} · ETA {task.fields[eta]} · {task.fields[failed]}"
        ),
    )
    rate, last = Rate(), None
    console = Console(file=out)
    with Progress(*columns, console=console, refresh_per_second=4) as bar:
        task = bar.add_task("watching", total=None, rate="-", eta="-", failed="0 failed")
        for job in updates:
            now = time.monotonic()
            rate.add(job.batches_done, now)
            if last is None:
                bar.console.print(f"job {job.job_id} on {job.api} (Ctrl-C: stop watching)")
            last = job
            bar.update(
                task,
                description=job.status,
                total=job.total_batch_count or None,
                completed=job.batches_done,
                rate=rate_text(rate.per_second(now)),
                eta=seconds_text(rate.eta(job, now)),
                failed=f"{job.batches_failed} failed",
            )
    return last

"""A BatchAPI's jobs in one gateway: split and enqueued in the background, then supervised.

For each job this gateway holds, a task lists the input, enqueues its batches (records the NDJSON
batches that cannot run as failed at once), sets the job RUNNING with its totals, and, with
``batch.spawn_workers``, starts the job's ``workers`` worker processes (gateway/batchapi/worker.py)
and replaces those that die. It ends the job TIMED_OUT when its timeout passes and stops the
workers once the job has ended, however it ended.

A gateway holds a job by a lease in the job record (``owner``, ``owned_at``), renewed every third
of ``batch.visibility_timeout``. The gateway that accepted a job holds it first; when its lease
lapses (the gateway was killed, its machine lost) any gateway of the API adopts the job by
compare-and-swap: it goes on enqueuing from the batches already queued (the input is listed
again; an item list was stored with the job) or supervises the running job. A gateway that stops
cleanly gives its leases up, so its successor adopts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from gateway.batchapi.inputs import ITEM_LIST, Batch, InputFailed, Inputs, Source
from gateway.batchapi.jobs import (
    ENQUEUING,
    FAILED_WHILE_ENQUEUING,
    RUNNING,
    TIMED_OUT,
    WORKER_ERROR,
    Job,
    Jobs,
    Outcome,
    drop_job,
    job_queue,
)
from gateway.work import Queue, Work, WorkError
from modelmux_common.config import ApiConfig, BatchConfig
from modelmux_common.supervision import AsyncChild

log = structlog.get_logger("modelmux.batch")

# Batches enqueued per step (one transaction embedded, ten SQS calls of ten).
CHUNK = 100
# Items of a batch up to this size travel in its queue message; larger ones go to the store.
INLINE_BYTES = 200 * 1024
# How often the supervisor looks at a job (timeout, ended elsewhere, stale hook).
TICK = 0.5
# Restarts of a job's local workers (beyond one per worker) before the job is WORKER_ERROR.
MAX_RESTARTS = 5
STOP_GRACE = 1.0
# A lease not renewed for this share of it: the gateway stops the job's work here (checked
# every tenth of a lease; another gateway may adopt the job once the whole lease has passed).
FENCE = 0.8
# How long a stopping gateway waits for its enqueues to reach the end of a chunk.
CLOSE_WAIT = 5.0


class Disowned(Exception):
    """Another gateway adopted the job (this one's lease lapsed): this one lets it go."""


class BatchApi:
    """One BatchAPI in this gateway: its jobs, and the tasks that enqueue and supervise them."""

    def __init__(
        self,
        api: ApiConfig,
        *,
        work: Work,
        jobs: Jobs,
        inputs: Inputs,
        worker_command: list[str],
        env: dict[str, str],
    ) -> None:
        assert api.batch_config is not None
        self.api = api
        self.cfg: BatchConfig = api.batch_config
        self.work = work
        self.jobs = jobs
        self.inputs = inputs
        self.worker_command = worker_command
        self.env = env
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        self.me = uuid.uuid4().hex  # this gateway's name in the leases it holds
        self.lease = self.cfg.visibility_timeout
        self.leases: list[asyncio.Task[None]] = []
        self.renewed: dict[str, float] = {}  # job id: when its lease was last renewed (monotonic)

    async def resume(self) -> None:
        """Adopts the jobs whose lease has lapsed, then keeps renewing and adopting."""
        await self._adopt_lapsed()
        third, tenth = self.lease / 3, self.lease / 10
        self.leases = [
            asyncio.create_task(self._every(third, self._renew_held), name="batch-renew"),
            asyncio.create_task(self._every(third, self._adopt_lapsed), name="batch-adopt"),
            asyncio.create_task(self._every(tenth, self._fence), name="batch-fence"),
        ]

    def new_job(self, **fields: Any) -> Job:
        """A job record as SubmitJob creates it: ENQUEUING, held by this gateway."""
        now = time.time()
        return Job(
            api=self.api.name, status=ENQUEUING, owner=self.me, owned_at=now, updated_at=now,
            start_time=now, **fields,
        )  # fmt: skip

    def start(self, job: Job, source: Source) -> None:
        self._start(job.job_id, self._run(job, source))

    # -- leases --------------------------------------------------------------------------------

    async def _every(self, period: float, work: Callable[[], Awaitable[None]]) -> None:
        """``work`` every ``period``: renewals, adoptions and the fence each in a loop of their
        own, so a long scan of the store's jobs never delays a renewal."""
        while True:
            await asyncio.sleep(period)
            try:
                await work()
            except WorkError as exc:  # the store is away: the next round tries again
                log.warning("batch_lease_failed", api=self.api.name, error=str(exc))
            except Exception:  # a bug must not end the loop: other gateways would adopt
                log.exception("batch_lease_failed", api=self.api.name)

    async def _renew_held(self) -> None:
        """Renews the leases of the jobs this gateway holds, all at once, each bounded by a
        third of a lease; lets go of those another gateway adopted."""
        held = list(self.tasks)
        now, started = time.time(), time.monotonic()
        renewals = await asyncio.gather(
            *(self._renew(job_id, now, started) for job_id in held), return_exceptions=True
        )
        for job_id, failed in zip(held, renewals, strict=True):
            if isinstance(failed, WorkError | TimeoutError):  # tried again in a third of a lease
                log.warning("batch_lease_failed", job_id=job_id, error=str(failed) or "timed out")
            elif isinstance(failed, Exception):
                log.error("batch_lease_failed", job_id=job_id, error=repr(failed))

    async def _renew(self, job_id: str, now: float, started: float) -> None:
        renewal = self.jobs.update(job_id, self._renewed(now))
        held = await asyncio.wait_for(renewal, self.lease / 3)
        if held is not None and not held.ended and held.owner != self.me:
            log.warning("batch_job_adopted_elsewhere", job_id=job_id, owner=held.owner)
            self._cancel(job_id)
        elif job_id in self.tasks:
            self.renewed[job_id] = started  # (the record says ``now``, read before the write)

    async def _fence(self) -> None:
        """Stops the local work of each job whose lease this gateway has not renewed for FENCE
        of a lease: another gateway may adopt it once the whole lease has passed."""
        for job_id, at in list(self.renewed.items()):
            task = self.tasks.get(job_id)
            lapsing = time.monotonic() - at > FENCE * self.lease
            if lapsing and task is not None and not task.cancelling():
                log.warning("batch_lease_lost", job_id=job_id)
                task.cancel()

    def _cancel(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is not None and not task.cancelling():
            task.cancel()

    async def _adopt_lapsed(self) -> None:
        """Adopts the API's active jobs whose lease lapsed."""
        for job_id in await self.jobs.active():
            if job_id in self.tasks:
                continue
            try:
                await self._adopt(job_id, time.time())
            except WorkError as exc:  # this job's record is away: the next round tries again
                log.warning("batch_lease_failed", job_id=job_id, error=str(exc))

    async def _adopt(self, job_id: str, now: float) -> None:
        job = await self.jobs.get(job_id)
        if job is None or job.ended or now - job.owned_at < self.lease:
            return
        adopted = await self.jobs.update(job_id, self._adopted(job, now))
        if adopted is None or adopted.ended or adopted.owner != self.me:
            return
        log.info("batch_job_adopted", job_id=job_id, status=adopted.status, lost=job.owner)
        if adopted.status == ENQUEUING:
            self._start(job_id, self._run(adopted, None))
        else:
            self._start(job_id, self._supervise(adopted))

    def _adopted(self, seen: Job, now: float) -> Any:
        def adopt(old: Job) -> Job | None:
            if (old.owner, old.owned_at) != (seen.owner, seen.owned_at):
                return None  # renewed, or adopted by another gateway first
            return replace(old, owner=self.me, owned_at=now)

        return adopt

    def _renewed(self, now: float) -> Any:
        def renew(old: Job) -> Job | None:
            return replace(old, owned_at=now) if old.owner == self.me else None

        return renew

    def _released(self, old: Job) -> Job | None:
        return replace(old, owner="", owned_at=0.0) if old.owner == self.me else None

    async def _source(self, job: Job) -> Source:
        """What the job's SubmitJob asked for, from its record (and its stored item list)."""
        items = await self.jobs.items(job.job_id) if job.source == ITEM_LIST else []
        return Source(
            job.source, job.batch_size, items=items, paths=job.paths, includes=job.includes,
            excludes=job.excludes,
        )  # fmt: skip

    def _start(self, job_id: str, work: Any) -> None:
        self.wakeups[job_id] = asyncio.Event()
        task = asyncio.create_task(work, name=f"batch-{job_id}")
        self.tasks[job_id] = task
        self.renewed[job_id] = time.monotonic()

        def done(_: object) -> None:
            if self.tasks.get(job_id) is task:
                del self.tasks[job_id]
                self.wakeups.pop(job_id, None)
                self.renewed.pop(job_id, None)

        task.add_done_callback(done)

    def wake(self, job_id: str) -> None:
        """The job changed here (StopJob): its supervisor looks at once."""
        event = self.wakeups.get(job_id)
        if event is not None:
            event.set()

    async def close(self) -> None:
        """Stops this gateway's tasks (an enqueue stops between two chunks) and gives up its
        leases: another gateway adopts the jobs on its next round, a gateway starting at once."""
        for loop in self.leases:
            loop.cancel()
        if self.leases:
            await asyncio.wait(self.leases)
        tasks = dict(self.tasks)
        for task in tasks.values():
            task.cancel()
        if tasks:
            await asyncio.wait(list(tasks.values()), timeout=CLOSE_WAIT)
        for job_id, task in tasks.items():
            if task.done():  # (one still listing its input keeps its lease, which lapses)
                with contextlib.suppress(WorkError):
                    await self.jobs.update(job_id, self._released)

    # -- enqueuing ---------------------------------------------------------------------------

    async def _run(self, job: Job, source: Source | None) -> None:
        """Enqueues the job (``source`` None: an adopted job's, read from its record), then
        supervises it."""
        try:
            if source is None:
                source = await self._source(job)
            enqueued = await self._enqueue(job, source)
        except Disowned:
            log.warning("batch_job_adopted_elsewhere", job_id=job.job_id)
            return
        except (InputFailed, WorkError, OSError) as exc:
            log.warning("batch_enqueue_failed", job_id=job.job_id, error=str(exc))
            try:
                ended = await self.jobs.end(
                    job.job_id, FAILED_WHILE_ENQUEUING, owner=self.me, error=str(exc)
                )
                if ended is not None and ended.ended:
                    await drop_job(self.work, self.jobs, job.job_id)
            except WorkError as again:  # the store is away: the job is adopted once it is back
                log.warning("batch_enqueue_failed", job_id=job.job_id, error=str(again))
            return
        if enqueued is not None and enqueued.status == RUNNING:
            await self._supervise(enqueued)

    async def _enqueue(self, job: Job, source: Source) -> Job | None:
        queue = await self.work.queue(
            job_queue(self.api.name, job.job_id), max_receive_count=job.max_runs
        )
        loop = asyncio.get_running_loop()
        totals = [0, 0]  # items, batches
        queued = job.total_batch_count  # an adopted job: the batches its first owner queued

        stop = threading.Event()

        def produce() -> None:
            chunk: list[Batch] = []
            for batch in self.inputs.batches(source):
                if stop.is_set():
                    return
                totals[0] += len(batch.items)
                totals[1] += 1
                if batch.index < queued:
                    continue
                chunk.append(batch)
                if len(chunk) == CHUNK:
                    asyncio.run_coroutine_threadsafe(self._put(job, queue, chunk), loop).result()
                    chunk = []
            if chunk and not stop.is_set():
                asyncio.run_coroutine_threadsafe(self._put(job, queue, chunk), loop).result()

        producing = asyncio.ensure_future(asyncio.to_thread(produce))
        try:
            await asyncio.shield(producing)
        except asyncio.CancelledError:  # nothing is queued for the job once this returns
            stop.set()
            while not producing.done():  # (a second cancel must not end the wait)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([producing])
            raise
        items, batches = totals
        log.info("batch_enqueued", job_id=job.job_id, items=items, batches=batches)

        def running(old: Job) -> Job | None:
            if old.status != ENQUEUING or old.owner != self.me:
                return None
            # (never below what was queued: a listing that shrank since still has those batches)
            total = max(batches, old.total_batch_count)
            return replace(old, status=RUNNING, item_count=items, total_batch_count=total)

        enqueued = await self.jobs.update(job.job_id, running)
        if enqueued is not None and enqueued.owner != self.me:
            raise Disowned(job.job_id)
        if source.kind == ITEM_LIST:
            with contextlib.suppress(WorkError):  # it is in the queue now; drop_job deletes it too
                await self.jobs.drop_items(job.job_id)
        return enqueued

    async def _put(self, job: Job, queue: Queue, batches: list[Batch]) -> None:
        current = await self.jobs.get(job.job_id)
        if current is None or current.ended:  # stopped while enqueuing
            raise InputFailed(
                f"the job ended while it was enqueued ({getattr(current, 'status', '')})"
            )
        if current.owner != self.me:
            raise Disowned(job.job_id)
        bodies = []
        for batch in batches:
            batch_id = job.batch_id(batch.index)
            if batch.error:
                outcome = Outcome(
                    batch.index,
                    batch_id,
                    ok=False,
                    attempts=0,
                    at=time.time(),
                    error=batch.error,
                    items=batch.items,
                )
                await self.jobs.record(job.job_id, outcome)
                continue
            body = json.dumps({"i": batch.index, "b": batch_id, "items": batch.items})
            if len(body) > INLINE_BYTES:
                key = self.jobs.key(job.job_id, "batches", self.jobs.part(batch.index))
                data = json.dumps(batch.items).encode()
                await self.jobs.store.put(key, data, content_type="application/json")
                body = json.dumps({"i": batch.index, "b": batch_id, "key": key})
            bodies.append(body)
        if bodies:
            await queue.enqueue_many(bodies)
        queued = batches[-1].index + 1

        def progress(old: Job) -> Job | None:  # what GetJob shows, and where an adopter goes on
            if old.status != ENQUEUING or old.owner != self.me:
                return None
            return replace(old, total_batch_count=max(old.total_batch_count, queued))

        after = await self.jobs.update(job.job_id, progress)
        if after is not None and not after.ended and after.owner != self.me:
            raise Disowned(job.job_id)

    # -- supervision -------------------------------------------------------------------------

    async def _supervise(self, job: Job) -> None:
        """Runs the job's local workers (spawn_workers) until the job ends."""
        wakeup = self.wakeups.get(job.job_id) or asyncio.Event()
        workers: list[AsyncChild] = []
        restarts = 0
        try:
            while True:
                try:
                    current = await self.jobs.get(job.job_id)
                    if current is None or current.ended:
                        return
                    if current.owner != self.me:
                        log.warning("batch_job_adopted_elsewhere", job_id=job.job_id)
                        return
                    if current.due(time.time()):
                        error = "the job's timeout passed"
                        await self.jobs.end(job.job_id, TIMED_OUT, owner=self.me, error=error)
                        continue
                    if self.cfg.spawn_workers:
                        restarts += self._replace(current, workers)
                        if restarts > MAX_RESTARTS + current.workers:
                            error = f"its workers died {restarts} times (the log has their exits)"
                            await self.jobs.end(
                                job.job_id, WORKER_ERROR, owner=self.me, error=error
                            )
                            continue
                except WorkError as exc:  # the store is away: look again at the next tick
                    log.warning("batch_supervise_failed", job_id=job.job_id, error=str(exc))
                wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), TICK)
        finally:
            await asyncio.shield(self._stop_workers(workers))
            with contextlib.suppress(WorkError):
                ended = await self.jobs.get(job.job_id)
                if ended is not None and ended.ended:
                    await drop_job(self.work, self.jobs, job.job_id)

    def _replace(self, job: Job, workers: list[AsyncChild]) -> int:
        """Starts workers up to the job's count in place of those that died; returns how many
        were replaced (a worker that exited 0 found the job ended and is not replaced)."""
        restarted = 0
        for i, child in enumerate(workers):
            code = child.returncode
            if code is None or code == 0:
                continue
            log.warning("batch_worker_exited", job_id=job.job_id, pid=child.pid, exit=code)
            workers[i] = self._spawn(job)
            restarted += 1
        while len(workers) < job.workers:
            workers.append(self._spawn(job))
        return restarted

    def _spawn(self, job: Job) -> AsyncChild:
        command = [*self.worker_command, "--api", self.api.name, "--job", job.job_id]
        child = AsyncChild([sys.executable, *command], env=self.env)
        log.info("batch_worker_started", job_id=job.job_id, pid=child.pid)
        return child

    @staticmethod
    async def _stop_workers(workers: list[AsyncChild]) -> None:
        await asyncio.gather(
            *(w.stop(grace=STOP_GRACE) for w in workers if w.returncode is None),
            return_exceptions=True,
        )

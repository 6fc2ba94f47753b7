"""The modelmux.v1.Jobs service: every BatchAPI's jobs (protos/modelmux/v1/jobs.proto).

BatchAPIs serve no realtime traffic: their handlers run only in job worker processes
(gateway/batchapi/worker.py), started per job by gateway/batchapi/runner.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
from collections.abc import AsyncIterator
from typing import Any

import structlog
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from gateway.asyncapi.payloads import new_id
from gateway.batchapi.inputs import DRY_RUN_FILES, ITEM_LIST, Inputs, Source
from gateway.batchapi.jobs import (
    ENQUEUING,
    STATUSES,
    STOPPED,
    Job,
    Jobs,
    Outcome,
    job_queue,
    open_work,
)
from gateway.batchapi.runner import BatchApi
from gateway.errors import FailedPrecondition, InvalidArgument, NotFound, parse, shown
from gateway.tensors import from_value, struct_values
from gateway.work import Work, WorkError
from modelmux.v1 import jobs_pb2
from modelmux_common import tracing
from modelmux_common.config import Config

log = structlog.get_logger("modelmux.batch")

SERVICE = jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name
STATUS_NUMBERS = {name: jobs_pb2.JobStatus.Value(f"JOB_STATUS_{name}") for name in STATUSES}
STATUS_NAMES = {number: name for name, number in STATUS_NUMBERS.items()}
# How often WatchJob reads the job (its counts change in other processes, the workers).
WATCH_POLL = 0.25
MAX_WORKERS = 1000


class BatchApis:
    """Every BatchAPI of the config; the Jobs RPCs."""

    def __init__(
        self, config: Config, *, runtime_dir: str, gateway: str, env: dict[str, str]
    ) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.gateway = gateway  # where the workers' tensorflow_client reaches this gateway
        self.env = env
        self.names = [a.name for a in config.apis if a.kind == "BatchAPI" and a.batch_config]
        self.apis: dict[str, BatchApi] = {}
        self.works: list[Work] = []
        self.inputs = Inputs(config)
        self._queues: dict[str, Any] = {}
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.snapshot = ""
        if self.names:  # the workers get the config as this gateway loaded it
            self.snapshot = os.path.join(runtime_dir, "batch-config.pickle")
            with open(self.snapshot, "wb") as fh:
                pickle.dump(config, fh)

    async def start(self) -> None:
        if not self.names:
            return
        command = [
            "-m",
            "gateway.batchapi.worker",
            "--snapshot",
            self.snapshot,
            "--gateway",
            self.gateway,
        ]
        for api in self.config.apis:
            if api.name not in self.names:
                continue
            assert api.batch_config is not None
            work = await open_work(self.config, api.batch_config)
            self.works.append(work)
            batch = BatchApi(
                api,
                work=work,
                jobs=Jobs(api.name, work.store, notify=self._notify),
                inputs=self.inputs,
                worker_command=command,
                env=self.env,
            )
            self.apis[api.name] = batch
            await batch.resume()
        log.info("batch_apis", apis=self.names)

    async def close(self) -> None:
        await asyncio.gather(*(a.close() for a in self.apis.values()))
        await asyncio.gather(*(w.close() for w in self.works))

    # -- notifications (WatchJob) -------------------------------------------------------------

    def _notify(self, job: Job) -> None:
        for event in self._waiters.get(job.job_id, ()):
            event.set()

    @contextlib.contextmanager
    def _waiting(self, job_id: str) -> Any:
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id, set())
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(job_id, None)

    # -- lookups ------------------------------------------------------------------------------

    def _api(self, name: str) -> BatchApi:
        if not name:
            raise InvalidArgument("api is required")
        batch = self.apis.get(name)
        if batch is not None:
            return batch
        other = next((a for a in self.config.apis if a.name == name), None)
        if other is not None:
            hint = "" if other.kind == "BatchAPI" else f" (it is a {other.kind})"
            raise FailedPrecondition(f"API {name!r} is not a BatchAPI with a handler{hint}")
        raise NotFound(f"no API named {shown(name)} (BatchAPIs: {', '.join(self.names) or 'none'})")

    async def _find(self, api: str, job_id: str) -> tuple[BatchApi, Job]:
        """The job and its API (``api``, or when empty the BatchAPI that has it)."""
        if not job_id:
            raise InvalidArgument("job_id is required")
        candidates = [self._api(api)] if api else list(self.apis.values())
        for batch in candidates:
            try:
                job = await batch.jobs.get(job_id)
            except ValueError:  # not a valid store key: no such job
                job = None
            if job is not None:
                return batch, job
        where = f"API {api!r}" if api else f"any BatchAPI ({', '.join(self.names) or 'none'})"
        raise NotFound(f"no job {shown(job_id)} in {where}")

    async def _message(self, batch: BatchApi, job: Job) -> jobs_pb2.Job:
        ended, failed = await batch.jobs.counts(job.job_id)
        in_flight = 0
        if job.status not in (ENQUEUING,) and not job.ended:
            queue = self._queues.get(job.job_id)
            if queue is None:
                queue = await batch.work.queue(
                    job_queue(job.api, job.job_id), max_receive_count=job.max_runs
                )
                self._queues[job.job_id] = queue
            with contextlib.suppress(WorkError):
                in_flight = (await queue.stats()).in_flight
        else:
            self._queues.pop(job.job_id, None)
        return job_message(job, succeeded=ended - failed, failed=failed, in_flight=in_flight)

    # -- the RPCs -----------------------------------------------------------------------------

    async def submitjob(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(jobs_pb2.SubmitJobRequest, data)
        batch = self._api(request.api)
        call.model = request.api
        if not 1 <= request.workers <= MAX_WORKERS:
            raise InvalidArgument(f"workers {request.workers}: expected 1 to {MAX_WORKERS}")
        source = _source(request)
        timeout: float | None = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToTimedelta().total_seconds()
            if timeout <= 0:
                raise InvalidArgument(f"timeout {timeout:g} s: must be more than zero")
        dead_letter: int | None = None
        if request.HasField("dead_letter"):
            dead_letter = request.dead_letter.max_receive_count
            if not 1 <= dead_letter <= 1000:
                raise InvalidArgument(
                    f"dead_letter.max_receive_count {dead_letter}: expected 1 to 1000"
                )
        await asyncio.to_thread(self.inputs.check, source)
        if request.dry_run:
            listing = await asyncio.to_thread(self.inputs.dry_run, source)
            dry = jobs_pb2.DryRun(
                files=listing.files[:DRY_RUN_FILES],
                file_count=listing.file_count,
                item_count=listing.item_count,
                total_batch_count=listing.batch_count,
            )
            return jobs_pb2.SubmitJobResponse(dry_run=dry).SerializeToString()
        traced = tracing.active()
        job = batch.new_job(
            job_id=new_id(),
            workers=request.workers,
            config=struct_values(request.config) if request.HasField("config") else {},
            source=source.kind,
            batch_size=source.batch_size,
            paths=source.paths,
            includes=source.includes,
            excludes=source.excludes,
            timeout=timeout,
            dead_letter=dead_letter,
            traceparent="" if traced is None else traced.traceparent(call.span),
        )
        if source.kind == ITEM_LIST:  # stored before the reply, as the job's record is
            await batch.jobs.put_items(job.job_id, source.items)
        try:
            await batch.jobs.create(job)
        except WorkError:  # the caller gets UNAVAILABLE; leave no item list behind
            with contextlib.suppress(WorkError):
                await batch.jobs.drop_items(job.job_id)
            raise
        batch.start(job, source)
        log.info("batch_job_submitted", job_id=job.job_id, api=job.api, source=job.source)
        reply = jobs_pb2.SubmitJobResponse(job=job_message(job))
        return reply.SerializeToString()

    async def getjob(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(jobs_pb2.GetJobRequest, data)
        batch, job = await self._find(request.api, request.job_id)
        return jobs_pb2.GetJobResponse(job=await self._message(batch, job)).SerializeToString()

    async def stopjob(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(jobs_pb2.StopJobRequest, data)
        batch, job = await self._find(request.api, request.job_id)
        if job.ended:
            raise FailedPrecondition(f"job {job.job_id} already ended: {job.status}")
        ended = await batch.jobs.end(job.job_id, STOPPED, error="")
        if ended is None or ended.status != STOPPED:
            status = ended.status if ended is not None else "gone"
            raise FailedPrecondition(f"job {job.job_id} already ended: {status}")
        batch.wake(job.job_id)
        try:
            await batch.work.drop_queue(job_queue(job.api, job.job_id))
        except WorkError as exc:
            log.warning("batch_cleanup_failed", job_id=job.job_id, error=str(exc))
        return jobs_pb2.StopJobResponse(job=await self._message(batch, ended)).SerializeToString()

    async def listjobs(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(jobs_pb2.ListJobsRequest, data)
        size = _page_size(request.page_size)
        wanted = set()
        for number in request.statuses:
            if number not in STATUS_NAMES:
                raise InvalidArgument(f"statuses: {number} is not a JobStatus")
            wanted.add(STATUS_NAMES[number])
        names = [self._api(request.api).api.name] if request.api else list(self.apis)
        position, _, token = request.page_token.partition(":")
        start = int(position) if position.isdigit() else 0
        if request.page_token and (not position.isdigit() or start >= len(names)):
            raise InvalidArgument("page_token is not one ListJobs returned")
        out: list[jobs_pb2.Job] = []
        next_token = ""
        for i in range(start, len(names)):
            batch = self.apis[names[i]]
            try:
                found, token = await batch.jobs.page(size=size, token=token)
            except ValueError:
                raise InvalidArgument("page_token is not one ListJobs returned") from None
            for job in found:
                if not wanted or job.status in wanted:
                    out.append(await self._message(batch, job))
            if token:
                next_token = f"{i}:{token}"
                break
            if i + 1 < len(names):
                next_token, token = f"{i + 1}:", ""
                break
        return jobs_pb2.ListJobsResponse(jobs=out, next_page_token=next_token).SerializeToString()

    async def listfailedbatches(self, data: bytes, context: Any, call: Any) -> bytes:
        request = parse(jobs_pb2.ListFailedBatchesRequest, data)
        batch, job = await self._find(request.api, request.job_id)
        try:
            found, token = await batch.jobs.failed(
                job.job_id, size=_page_size(request.page_size), token=request.page_token
            )
        except ValueError:
            raise InvalidArgument("page_token is not one ListFailedBatches returned") from None
        reply = jobs_pb2.ListFailedBatchesResponse(
            batches=[failed_message(o) for o in found], next_page_token=token
        )
        return reply.SerializeToString()

    async def watchjob(self, data: bytes, context: Any) -> AsyncIterator[bytes]:
        request = parse(jobs_pb2.WatchJobRequest, data)
        batch, job = await self._find(request.api, request.job_id)
        last = b""
        with self._waiting(job.job_id) as event:
            while True:
                event.clear()
                current = await batch.jobs.get(job.job_id)
                if current is None:
                    return
                message = await self._message(batch, current)
                encoded = jobs_pb2.WatchJobResponse(job=message).SerializeToString()
                if encoded != last:
                    last = encoded
                    yield encoded
                if current.ended:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), WATCH_POLL)


def _page_size(size: int) -> int:
    size = size or 100
    if not 1 <= size <= 1000:
        raise InvalidArgument(f"page_size {size}: expected 1 to 1000")
    return size


def _source(request: jobs_pb2.SubmitJobRequest) -> Source:
    kind = request.WhichOneof("source")
    if kind is None:
        raise InvalidArgument(
            "no input source: give one of item_list, file_path_lister, delimited_files"
        )
    given = getattr(request, kind)
    if kind == ITEM_LIST:
        return Source(kind, given.batch_size, items=[from_value(v) for v in given.items])
    return Source(
        kind,
        given.batch_size,
        paths=list(given.paths),
        includes=list(given.includes),
        excludes=list(given.excludes),
    )


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def job_message(
    job: Job, *, succeeded: int = 0, failed: int = 0, in_flight: int = 0
) -> jobs_pb2.Job:
    out = jobs_pb2.Job(
        job_id=job.job_id,
        api=job.api,
        status=STATUS_NUMBERS[job.status],
        workers=job.workers,
        source=job.source,
        paths=job.paths,
        batch_size=job.batch_size,
        item_count=job.item_count,
        total_batch_count=job.total_batch_count,
        batches_succeeded=succeeded,
        batches_failed=failed,
        batches_in_flight=in_flight,
        start_time=_stamp(job.start_time),
        error=job.error,
        completion_hook=jobs_pb2.CompletionHookState.Value(f"COMPLETION_HOOK_STATE_{job.hook}"),
        hook_error=job.hook_error,
    )
    out.config.update(job.config)
    if job.timeout is not None:
        out.timeout.CopyFrom(duration_pb2.Duration(seconds=int(job.timeout)))
        out.timeout.nanos = round(job.timeout % 1 * 1e9)
    if job.dead_letter is not None:
        out.dead_letter.max_receive_count = job.dead_letter
    if job.end_time is not None:
        out.end_time.CopyFrom(_stamp(job.end_time))
    return out


def failed_message(outcome: Outcome) -> jobs_pb2.FailedBatch:
    out = jobs_pb2.FailedBatch(
        batch_id=outcome.batch_id,
        index=outcome.index,
        attempts=outcome.attempts,
        error=outcome.error,
        dead_lettered=outcome.dead_lettered,
        failed_at=_stamp(outcome.at),
    )
    for item in outcome.items or ():
        out.items.add().CopyFrom(_value(item))
    return out


def _value(item: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(item, value)
    return value

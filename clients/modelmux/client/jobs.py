"""Batch jobs (``modelmux.v1.Jobs``): requests built and replies read for both client faces.

``Client`` and ``AsyncClient`` call these, so a job reads the same from either: a ``Job`` with
its status (without the wire's ``JOB_STATUS_`` prefix), batch counts and times as epoch seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from modelmux.client.calls import JsonValue
from modelmux.v1 import jobs_pb2

JobStatus = Literal[
    "UNSPECIFIED",
    "ENQUEUING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED_WHILE_ENQUEUING",
    "COMPLETED_WITH_FAILURES",
    "WORKER_ERROR",
    "TIMED_OUT",
    "STOPPED",
]
HookState = Literal["UNSPECIFIED", "ABSENT", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "SKIPPED"]
ACTIVE_STATUSES = ("UNSPECIFIED", "ENQUEUING", "RUNNING")


@dataclass(frozen=True, slots=True)
class Job:
    """A batch job as the gateway reports it. Times are epoch seconds (None when unset);
    ``timeout`` is seconds (None: no limit); ``max_receive_count`` is the dead-letter policy's
    runs per batch (None: a failing batch fails after one run)."""

    job_id: str
    api: str
    status: JobStatus
    workers: int
    config: dict[str, JsonValue]
    timeout: float | None
    max_receive_count: int | None
    source: str
    paths: list[str]
    batch_size: int
    item_count: int
    total_batch_count: int
    batches_succeeded: int
    batches_failed: int
    batches_in_flight: int
    start_time: float | None
    end_time: float | None
    error: str
    completion_hook: HookState
    hook_error: str

    @property
    def done(self) -> bool:
        """The job has ended (in any status after RUNNING)."""
        return self.status not in ACTIVE_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    @property
    def batches_done(self) -> int:
        """Batches that have ended, either way."""
        return self.batches_succeeded + self.batches_failed


@dataclass(frozen=True, slots=True)
class DryRun:
    """What a job would process: the first 1000 files listed, and the counts."""

    files: list[str]
    file_count: int
    item_count: int
    total_batch_count: int


@dataclass(frozen=True, slots=True)
class FailedBatch:
    """A batch that failed for good, with its items as handle_batch got them."""

    batch_id: str
    index: int
    attempts: int
    error: str
    dead_lettered: bool
    failed_at: float | None
    items: list[JsonValue]


def submit_job_request(
    api: str,
    *,
    workers: int,
    items: Sequence[JsonValue] | None,
    files: Sequence[str],
    ndjson: Sequence[str],
    batch_size: int,
    includes: Sequence[str],
    excludes: Sequence[str],
    config: Mapping[str, JsonValue] | None,
    job_timeout: float | None,
    max_receive_count: int | None,
    dry_run: bool,
) -> jobs_pb2.SubmitJobRequest:
    """A SubmitJob with exactly one source: ``items`` (JSON values), ``files`` (each item a file
    path) or ``ndjson`` (each line of each file an item); the latter two list s3:// prefixes or
    absolute local folders, filtered by ``includes`` / ``excludes`` globs."""
    given = [name for name, v in (("items", items), ("files", files), ("ndjson", ndjson)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of items, files or ndjson (given: {given or 'none'})")
    if items is not None and (includes or excludes):
        raise ValueError("includes and excludes filter files: they do not apply to items")
    request = jobs_pb2.SubmitJobRequest(api=api, workers=workers, dry_run=dry_run)
    if config:
        request.config.update(dict(config))
    if job_timeout is not None:
        request.timeout.FromNanoseconds(round(job_timeout * 1e9))
    if max_receive_count is not None:
        request.dead_letter.max_receive_count = max_receive_count
    if items is not None:
        holder = struct_pb2.Struct()
        holder.update({"items": list(items)})
        request.item_list.items.extend(holder.fields["items"].list_value.values)
        request.item_list.batch_size = batch_size
    else:
        listed = request.file_path_lister if files else request.delimited_files
        listed.paths.extend(files or ndjson)
        listed.includes.extend(includes)
        listed.excludes.extend(excludes)
        listed.batch_size = batch_size
    return request


def _seconds(stamp: timestamp_pb2.Timestamp, present: bool) -> float | None:
    return stamp.ToNanoseconds() / 1e9 if present else None


def job(message: jobs_pb2.Job) -> Job:
    config: dict[str, JsonValue] = json_format.MessageToDict(message.config)
    return Job(
        job_id=message.job_id,
        api=message.api,
        status=jobs_pb2.JobStatus.Name(message.status).removeprefix("JOB_STATUS_"),  # type: ignore[arg-type]
        workers=message.workers,
        config=config,
        timeout=message.timeout.ToNanoseconds() / 1e9 if message.HasField("timeout") else None,
        max_receive_count=(
            message.dead_letter.max_receive_count if message.HasField("dead_letter") else None
        ),
        source=message.source,
        paths=list(message.paths),
        batch_size=message.batch_size,
        item_count=message.item_count,
        total_batch_count=message.total_batch_count,
        batches_succeeded=message.batches_succeeded,
        batches_failed=message.batches_failed,
        batches_in_flight=message.batches_in_flight,
        start_time=_seconds(message.start_time, message.HasField("start_time")),
        end_time=_seconds(message.end_time, message.HasField("end_time")),
        error=message.error,
        completion_hook=jobs_pb2.CompletionHookState.Name(message.completion_hook).removeprefix(  # type: ignore[arg-type]
            "COMPLETION_HOOK_STATE_"
        ),
        hook_error=message.hook_error,
    )


def submitted(reply: jobs_pb2.SubmitJobResponse) -> Job | DryRun:
    if reply.HasField("dry_run"):
        dry = reply.dry_run
        return DryRun(
            files=list(dry.files),
            file_count=dry.file_count,
            item_count=dry.item_count,
            total_batch_count=dry.total_batch_count,
        )
    return job(reply.job)


def list_jobs_request(
    api: str, *, statuses: Sequence[str], page_size: int, page_token: str
) -> jobs_pb2.ListJobsRequest:
    numbers = [jobs_pb2.JobStatus.Value(f"JOB_STATUS_{s}") for s in statuses]
    return jobs_pb2.ListJobsRequest(
        api=api, statuses=numbers, page_size=page_size, page_token=page_token
    )


def jobs_page(reply: jobs_pb2.ListJobsResponse) -> tuple[list[Job], str]:
    return [job(j) for j in reply.jobs], reply.next_page_token


def failed_page(reply: jobs_pb2.ListFailedBatchesResponse) -> tuple[list[FailedBatch], str]:
    batches = []
    for b in reply.batches:
        items = struct_pb2.ListValue()
        items.values.extend(b.items)
        batches.append(
            FailedBatch(
                batch_id=b.batch_id,
                index=b.index,
                attempts=b.attempts,
                error=b.error,
                dead_lettered=b.dead_lettered,
                failed_at=_seconds(b.failed_at, b.HasField("failed_at")),
                items=json_format.MessageToDict(items),  # type: ignore[arg-type]
            )
        )
    return batches, reply.next_page_token

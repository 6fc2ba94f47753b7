"""One BatchAPI's jobs in the work layer's store: job records, batch outcomes, the hook claim.

Keys under ``<api>/`` (docs/batch.md, "Layout"):

``jobs/<job>/job``           the job record (JSON), changed only by compare-and-swap and never
                             away from a terminal status
``jobs/<job>/items``         an item_list job's items until they are enqueued (stored before
                             SubmitJob replies, so a gateway that adopts the job can enqueue them)
``jobs/<job>/batches/<n>``   a batch's items when they do not fit in its queue message
``jobs/<job>/outcomes/<n>``  each batch's outcome, created once (create-if-absent): the first
                             outcome of a batch stands, a redelivered batch's second run is
                             discarded; counting ended batches is listing this prefix
``jobs/<job>/failed/<n>``    an empty marker per failed batch (counting failures is listing it)
``jobs/<job>/hook``          the completion hook's claim (create-if-absent) and how it ended
``index/<inverted id>``      one marker per job, newest first (ListJobs)
``active/<job>``             one marker per job that has not ended (what workers look for)

Nothing here imports grpc; the handler's worker processes use it as the gateway does.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import structlog

from gateway.work import (
    AlreadyExists,
    Conflict,
    Store,
    Work,
    WorkError,
    open_configured,
    queue_name,
)
from modelmux_common.config import BatchConfig, Config

log = structlog.get_logger("modelmux.batch")

ENQUEUING, RUNNING, SUCCEEDED = "ENQUEUING", "RUNNING", "SUCCEEDED"
FAILED_WHILE_ENQUEUING, COMPLETED_WITH_FAILURES = (
    "FAILED_WHILE_ENQUEUING",
    "COMPLETED_WITH_FAILURES",
)
WORKER_ERROR, TIMED_OUT, STOPPED = "WORKER_ERROR", "TIMED_OUT", "STOPPED"
STATUSES = (
    ENQUEUING,
    RUNNING,
    SUCCEEDED,
    FAILED_WHILE_ENQUEUING,
    COMPLETED_WITH_FAILURES,
    WORKER_ERROR,
    TIMED_OUT,
    STOPPED,
)
TERMINAL = frozenset(STATUSES[2:])
# completion hook states
HOOK_ABSENT, HOOK_PENDING, HOOK_RUNNING = "ABSENT", "PENDING", "RUNNING"
HOOK_SUCCEEDED, HOOK_FAILED, HOOK_SKIPPED = "SUCCEEDED", "FAILED", "SKIPPED"
JSON = "application/json"
# Without dead_letter a batch whose handler raises fails after one run, but one whose worker died
# runs again: at most this many times in all, then it is recorded as failed (a batch that kills
# its worker every time must not loop forever).
LOST_RUNS = 3
BATCH_IDS = uuid.UUID("6d6f6465-6c6d-7578-8000-626174636865")  # the namespace of batch ids


def _hex_inverted(text: str) -> str:
    return "".join(
        "0123456789abcdef"[15 - int(c, 16)] if c in "0123456789abcdef" else c for c in text
    )


@dataclass(frozen=True, slots=True)
class Job:
    """A job record: what was submitted, where it is, and its totals once enqueued."""

    job_id: str
    api: str
    status: str
    workers: int
    config: dict[str, Any]
    source: str
    batch_size: int
    start_time: float
    paths: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    timeout: float | None = None
    dead_letter: int | None = None  # dead_letter.max_receive_count
    item_count: int = 0
    total_batch_count: int = 0
    end_time: float | None = None
    error: str = ""
    hook: str = HOOK_PENDING
    hook_error: str = ""
    updated_at: float = 0.0
    # the gateway that enqueues and supervises the job, and when it last renewed that lease
    owner: str = ""
    owned_at: float = 0.0
    # the SubmitJob call's W3C traceparent, with tracing on: each batch's span links to it
    traceparent: str = ""
    # fields a newer version wrote, kept as they are when this one writes the record back
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def encode(self) -> bytes:
        body = asdict(self)
        extra = body.pop("extra")
        return json.dumps({**extra, **body}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> Job:
        data = json.loads(body)
        known = {k: v for k, v in data.items() if k in JOB_FIELDS}
        return cls(**known, extra={k: v for k, v in data.items() if k not in JOB_FIELDS})

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def max_runs(self) -> int:
        """Runs of a batch before it fails for good (handler errors with dead_letter; lost runs)."""
        return self.dead_letter if self.dead_letter is not None else LOST_RUNS

    def due(self, now: float) -> bool:
        """True when the job's timeout has passed."""
        return self.timeout is not None and now >= self.start_time + self.timeout

    def batch_id(self, index: int) -> str:
        """Batch ``index``'s id, a UUID: the same each time the batch is queued (an adopted job
        may queue a batch twice), so the handler can use it as its idempotency key."""
        return str(uuid.uuid5(BATCH_IDS, f"{self.job_id}/{index}"))

    def spec(self) -> dict[str, Any]:
        """The handler's job_spec (the seeds' fields)."""
        return {
            "job_id": self.job_id,
            "api_name": self.api,
            "config": self.config,
            "workers": self.workers,
            "total_batch_count": self.total_batch_count,
            "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start_time)),
        }


JOB_FIELDS = frozenset(f.name for f in fields(Job)) - {"extra"}


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one batch ended. ``items`` only for a failed batch (ListFailedBatches shows them)."""

    index: int
    batch_id: str
    ok: bool
    attempts: int
    at: float
    seconds: float = 0.0
    error: str = ""
    dead_lettered: bool = False
    items: list[Any] | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> Outcome:
        return cls(**json.loads(body))


@dataclass(frozen=True, slots=True)
class Hook:
    """The completion hook's record: created by the one worker that runs it (the claim)."""

    state: str
    owner: str
    renewed_at: float
    error: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> Hook:
        return cls(**json.loads(body))


class Jobs:
    """One BatchAPI's jobs in ``store``. ``notify`` is called with every job record this
    process writes (WatchJob wakes on it)."""

    def __init__(
        self, api: str, store: Store, *, notify: Callable[[Job], None] | None = None
    ) -> None:
        self.api = api
        self.store = store
        self.notify = notify or (lambda job: None)

    def key(self, job_id: str, *parts: str) -> str:
        return "/".join((self.api, "jobs", job_id, *parts))

    @staticmethod
    def part(index: int) -> str:
        return f"{index:09d}"

    # -- job records -------------------------------------------------------------------------

    async def create(self, job: Job) -> None:
        """Stores a new job: its active marker, its listing marker, then its record (a marker
        whose record is missing is skipped, so a failure part way leaves no job behind)."""
        await self.store.put(f"{self.api}/active/{job.job_id}", b"", content_type=JSON)
        await self.store.put(
            f"{self.api}/index/{_hex_inverted(job.job_id)}", job.job_id.encode(), content_type=JSON
        )
        await self.store.put(
            self.key(job.job_id, "job"), job.encode(), content_type=JSON, if_absent=True
        )
        self.notify(job)

    async def put_items(self, job_id: str, items: list[Any]) -> None:
        await self.store.put(
            self.key(job_id, "items"), json.dumps(items).encode(), content_type=JSON
        )

    async def drop_items(self, job_id: str) -> None:
        await self.store.delete(self.key(job_id, "items"))

    async def items(self, job_id: str) -> list[Any]:
        blob = await self.store.get(self.key(job_id, "items"))
        if blob is None:
            raise WorkError(f"job {job_id}: its item list is not in the store")
        items: list[Any] = json.loads(blob.body)
        return items

    async def get(self, job_id: str) -> Job | None:
        blob = await self.store.get(self.key(job_id, "job"))
        return None if blob is None else Job.decode(blob.body)

    async def update(self, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
        """Read, change, compare-and-swap until it holds; ``change`` returns None to leave the
        record as it is, and is not called for a job that ended. Returns the record after."""
        key = self.key(job_id, "job")
        while True:
            blob = await self.store.get(key)
            if blob is None:
                return None
            old = Job.decode(blob.body)
            new = None if old.ended else change(old)
            if new is None or new == old:
                return old
            new = replace(new, updated_at=time.time())
            try:
                await self.store.put(key, new.encode(), content_type=JSON, if_version=blob.version)
            except Conflict:
                continue
            if new.status != old.status:
                log.info(
                    "batch_job_status",
                    job_id=job_id,
                    api=self.api,
                    status=new.status,
                    **({"error": new.error} if new.error else {}),
                )
            if new.ended:
                await self.store.delete(f"{self.api}/active/{job_id}")
            self.notify(new)
            return new

    async def end(
        self, job_id: str, status: str, *, hook: str = "", owner: str | None = None, **fields: Any
    ) -> Job | None:
        """Ends the job with ``status`` unless it ended already (or, given ``owner``, another
        gateway holds it); returns the record after (its status says whether this call ended it).
        A job that ends before its hook ran skips it."""

        def change(old: Job) -> Job | None:
            if owner is not None and old.owner != owner:
                return None
            state = hook or (
                old.hook if old.hook not in (HOOK_PENDING, HOOK_RUNNING) else HOOK_SKIPPED
            )
            return replace(old, status=status, end_time=time.time(), hook=state, **fields)

        return await self.update(job_id, change)

    async def active(self) -> list[str]:
        """Ids of the jobs that have not ended, oldest first."""
        ids: list[str] = []
        token = ""
        while True:
            page = await self.store.list(f"{self.api}/active/", token=token)
            ids.extend(e.key.rsplit("/", 1)[-1] for e in page.entries)
            token = page.next_token
            if not token:
                return ids

    async def page(self, *, size: int, token: str) -> tuple[list[Job], str]:
        """One page of jobs, newest first."""
        listing = await self.store.list(f"{self.api}/index/", limit=size, token=token)
        ids = [_hex_inverted(e.key.rsplit("/", 1)[-1]) for e in listing.entries]
        jobs = [job for job_id in ids if (job := await self.get(job_id)) is not None]
        return jobs, listing.next_token

    # -- batch outcomes ----------------------------------------------------------------------

    async def outcome(self, job_id: str, index: int) -> Outcome | None:
        blob = await self.store.get(self.key(job_id, "outcomes", self.part(index)))
        return None if blob is None else Outcome.decode(blob.body)

    async def record(self, job_id: str, outcome: Outcome) -> Outcome:
        """Records a batch's outcome unless it has one; returns the one that stands (its failure
        marker written, again if a crash left it out)."""
        key = self.key(job_id, "outcomes", self.part(outcome.index))
        try:
            await self.store.put(key, outcome.encode(), content_type=JSON, if_absent=True)
            standing = outcome
        except AlreadyExists:
            found = await self.outcome(job_id, outcome.index)
            standing = found if found is not None else outcome
        if not standing.ok:
            marker = self.key(job_id, "failed", self.part(standing.index))
            await self.store.put(marker, b"", content_type=JSON)
        return standing

    async def _count(self, prefix: str) -> int:
        count, token = 0, ""
        while True:
            page = await self.store.list(prefix, token=token)
            count += len(page.entries)
            token = page.next_token
            if not token:
                return count

    async def counts(self, job_id: str) -> tuple[int, int]:
        """(batches ended, batches failed)."""
        ended = await self._count(self.key(job_id, "outcomes") + "/")
        failed = await self._count(self.key(job_id, "failed") + "/") if ended else 0
        return ended, failed

    async def failed(self, job_id: str, *, size: int, token: str) -> tuple[list[Outcome], str]:
        """One page of the job's failed batches, in batch order."""
        listing = await self.store.list(self.key(job_id, "failed") + "/", limit=size, token=token)
        out = []
        for entry in listing.entries:
            found = await self.outcome(job_id, int(entry.key.rsplit("/", 1)[-1]))
            if found is not None:
                out.append(found)
        return out, listing.next_token

    # -- the completion hook -----------------------------------------------------------------

    async def claim_hook(self, job_id: str, owner: str) -> bool:
        """True for the one caller that may run the hook (or, without one, end the job)."""
        hook = Hook(HOOK_RUNNING, owner, time.time())
        try:
            await self.store.put(
                self.key(job_id, "hook"), hook.encode(), content_type=JSON, if_absent=True
            )
        except AlreadyExists:
            return False
        return True

    async def hook(self, job_id: str) -> tuple[Hook | None, str]:
        blob = await self.store.get(self.key(job_id, "hook"))
        return (None, "") if blob is None else (Hook.decode(blob.body), blob.version)

    async def set_hook(self, job_id: str, change: Callable[[Hook], Hook | None]) -> Hook | None:
        """Compare-and-swap of the hook record; None when it is not there or ``change`` says so."""
        while True:
            hook, version = await self.hook(job_id)
            new = change(hook) if hook is not None else None
            if new is None:
                return None
            try:
                await self.store.put(
                    self.key(job_id, "hook"), new.encode(), content_type=JSON, if_version=version
                )
            except Conflict:
                continue
            return new

    async def reap_hook(self, job_id: str, *, stale_after: float) -> Job | None:
        """Ends as WORKER_ERROR a job whose hook runner stopped renewing its claim (it died while
        the hook ran): the hook is not run again, so it ran at most once."""
        now = time.time()

        def lost(hook: Hook) -> Hook | None:
            if hook.state != HOOK_RUNNING or now - hook.renewed_at < stale_after:
                return None
            return replace(hook, state=HOOK_FAILED, error="its runner died while it ran")

        reaped = await self.set_hook(job_id, lost)
        if reaped is None:
            return None
        error = (
            f"the completion hook's runner ({reaped.owner}) died while the hook ran; it is not "
            "run a second time"
        )
        return await self.end(job_id, WORKER_ERROR, hook=HOOK_FAILED, hook_error=error, error=error)

    async def drop(self, job_id: str) -> None:
        """Deletes what only a running job needs (its items, batch payloads); outcomes stay."""
        await self.drop_items(job_id)
        await self.store.delete_prefix(self.key(job_id, "batches") + "/")


def job_queue(api: str, job_id: str) -> str:
    return queue_name("batch", api, job_id)


def store_folder(config: Config, cfg: BatchConfig) -> str:
    return cfg.folder or os.path.join(config.gateway.state_dir, "batch")


async def open_work(config: Config, cfg: BatchConfig) -> Work:
    """The job store and queues of a BatchAPI's ``batch`` section."""
    return await open_configured(cfg, store_folder(config, cfg))


async def drop_job(work: Work, jobs: Jobs, job_id: str) -> None:
    """What an ended job no longer needs: its queues and its batches' items (outcomes stay)."""
    try:
        await work.drop_queue(job_queue(jobs.api, job_id))
        await jobs.drop(job_id)
    except WorkError as exc:
        log.warning("batch_cleanup_failed", job_id=job_id, error=str(exc))

"""One AsyncAPI's requests in the work layer's store and queue: submit, read, finish, cancel.

Per request, under the seeds' layout (docs/async.md, "Layout"):

``<api>/<id>/payload``  the bytes submitted, with their content type (deleted once it ended)
``<api>/<id>/status``   a small JSON record: state, attempts, times, the payload's MD5
``<api>/<id>/result``   the outcome, created once (create-if-absent): the result of a COMPLETED
                        request, or a JSON record of a FAILED or CANCELLED one (OUTCOME_TYPE)

The result record decides: whoever creates it first (a run, a cancel, the dead-letter drain) fixes
how the request ended; everyone else reads it. The status follows it (compare-and-swap writes), and
a status that lags (a crash between the two writes) is brought in line by whoever meets it next.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import grpc
import structlog

from gateway.errors import FailedPrecondition, GatewayError, NotFound, ResourceExhausted, shown
from gateway.work import AlreadyExists, Blob, Conflict, Put, Queue, Work
from gateway.work.base import content_version
from modelmux_common.config import AsyncConfig

log = structlog.get_logger("modelmux.async")

IN_QUEUE, IN_PROGRESS = "IN_QUEUE", "IN_PROGRESS"
COMPLETED, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"
TERMINAL = (COMPLETED, FAILED, CANCELLED)
OUTCOME_TYPE = "application/vnd.modelmux.outcome+json"
STATUS_TYPE = "application/json"
# A payload is deleted when its request ends; this expiry only catches one whose submitter died
# before enqueueing it (it was never acknowledged). SQS keeps a message at most 14 days.
PAYLOAD_BACKSTOP = 15 * 24 * 3600.0
# How long the status of an expired request stays, so that Get says "expired" (docs/async.md).
TOMBSTONE_KEEP = 30 * 24 * 3600.0
# How long a queue's counts are reused for async.max_queued (SQS's are approximate anyway).
STATS_TTL = 0.5


@dataclass(frozen=True, slots=True)
class Status:
    """The status record of one request."""

    id: str
    api: str
    state: str
    payload_md5: str
    content_type: str
    submitted_at: float
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    error: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, body: bytes) -> Status:
        return cls(**json.loads(body))


@dataclass(frozen=True, slots=True)
class Record:
    """A request as the caller sees it: its status and, once COMPLETED, the result blob."""

    status: Status
    result: Blob | None = None


class Requests:
    """One AsyncAPI's requests. ``notify`` is called with every status this process writes."""

    def __init__(
        self,
        api: str,
        *,
        work: Work,
        queue: Queue,
        config: AsyncConfig,
        notify: Callable[[Status], None],
    ) -> None:
        self.api = api
        self.work = work
        self.store = work.store
        self.queue = queue
        self.config = config
        self.notify = notify
        self.stats = QueueCount(queue)

    def key(self, request_id: str, part: str) -> str:
        return f"{self.api}/{request_id}/{part}"

    # -- submit ------------------------------------------------------------------------------

    async def submit(self, request_id: str, body: bytes, content_type: str) -> bool:
        """Stores, queues and records the request; True when it is new, False when the same id
        and payload were submitted before. Order: payload, queue message, status, so that a
        status always has its message (docs/async.md, "Crash points"); the embedded store writes
        the three in one commit."""
        if len(body) > self.config.max_payload_bytes:
            raise ResourceExhausted(
                f"payload of {len(body)} bytes is over API {self.api!r}'s "
                f"async.max_payload_bytes ({self.config.max_payload_bytes})"
            )
        queued = await self.stats.queued()
        if queued >= self.config.max_queued:
            raise ResourceExhausted(
                f"API {self.api!r} has {queued} requests queued or running, its "
                f"async.max_queued ({self.config.max_queued}); retry later"
            )
        md5 = content_version(body)
        now = time.time()
        status = Status(request_id, self.api, IN_QUEUE, md5, content_type, now)
        payload_key = self.key(request_id, "payload")
        payload = Put(payload_key, body, content_type, expires_at=now + PAYLOAD_BACKSTOP)
        record = Put(self.key(request_id, "status"), status.encode(), STATUS_TYPE)
        first = [payload]
        try:
            try:
                await self.work.enqueue_with(self.queue, request_id, first=first, then=[record])
            except AlreadyExists as exc:
                if exc.key != payload_key:
                    raise
                if not await self._same_request(request_id, md5, content_type):
                    raise _Exists(
                        f"request {shown(request_id)} of API {self.api!r} exists with another "
                        "payload"
                    ) from None
                if await self._status_blob(request_id) is not None:
                    return False  # acknowledged before (a status always has its message)
                # stored by a submitter that died before queueing it: queue it now
                await self.work.enqueue_with(self.queue, request_id, first=[], then=[record])
        except AlreadyExists:
            return await self._status_taken(request_id, md5, content_type)
        self.stats.added()
        self.notify(status)
        log.info("async_state", request_id=request_id, api=self.api, state=IN_QUEUE, attempt=0)
        return True

    async def _status_taken(self, request_id: str, md5: str, content_type: str) -> bool:
        """The status write found one: a runner met the message first and wrote it (the request
        is new, not ended), or the id belongs to a request that ended (its payload was deleted,
        so the payload write went through): then the message just sent finds its outcome and is
        dropped, and the payloads are compared as for a request still running."""
        existing = await self.status(request_id)
        if existing is None or existing.state not in TERMINAL:
            return True
        if existing.payload_md5 != md5 or existing.content_type != content_type:
            raise _Exists(
                f"request {shown(request_id)} of API {self.api!r} exists with another payload"
            ) from None
        return False

    async def _same_request(self, request_id: str, md5: str, content_type: str) -> bool:
        blob = await self._status_blob(request_id)
        if blob is not None:
            status = Status.decode(blob.body)
            return status.payload_md5 == md5 and status.content_type == content_type
        payload = await self.store.get(self.key(request_id, "payload"))
        return payload is None or (payload.version == md5 and payload.content_type == content_type)

    # -- reading -----------------------------------------------------------------------------

    async def _status_blob(self, request_id: str) -> Blob | None:
        return await self.store.get(self.key(request_id, "status"))

    async def status(self, request_id: str) -> Status | None:
        blob = await self._status_blob(request_id)
        return None if blob is None else Status.decode(blob.body)

    async def get(self, request_id: str, *, with_result: bool = True) -> Record:
        """The request; NotFound for an unknown id, and NotFound saying when for an expired one."""
        status_blob, result = await asyncio.gather(
            self._status_blob(request_id),
            self.store.get(self.key(request_id, "result")) if with_result else _none(),
        )
        if status_blob is None:
            raise NotFound(f"API {self.api!r} has no request {shown(request_id)}")
        status = Status.decode(status_blob.body)
        if result is not None and status.state not in TERMINAL:
            # the status write after the outcome is pending
            status = _ended(status, result, self.config.result_ttl)
        if result is not None and result.content_type == OUTCOME_TYPE:
            result = None
        if status.state == COMPLETED and with_result and result is None:
            raise NotFound(self.expired(status))
        if status.expires_at is not None and time.time() >= status.expires_at:
            raise NotFound(self.expired(status))
        return Record(status, result)

    def expired(self, status: Status) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(status.expires_at or 0))
        return (
            f"request {status.id} of API {self.api!r} expired at {when} (it ended "
            f"{status.state}; results are kept for async.result_ttl, "
            f"{self.config.result_ttl:g} s)"
        )

    async def outcome(self, request_id: str) -> Blob | None:
        return await self.store.get(self.key(request_id, "result"))

    # -- state changes -----------------------------------------------------------------------

    async def transition(
        self, request_id: str, change: Callable[[Status | None], Status | None]
    ) -> Status | None:
        """Read, change, compare-and-swap until it holds; ``change`` returns None to leave the
        record as it is. Returns the record as it is afterwards."""
        key = self.key(request_id, "status")
        while True:
            blob = await self.store.get(key)
            old = None if blob is None else Status.decode(blob.body)
            new = change(old)
            if new is None or new == old:
                return old
            expires = None if new.expires_at is None else new.expires_at + TOMBSTONE_KEEP
            try:
                await self.store.put(
                    key,
                    new.encode(),
                    content_type=STATUS_TYPE,
                    if_absent=blob is None,
                    if_version=None if blob is None else blob.version,
                    expires_at=expires,
                )
            except Conflict:
                continue
            if old is None or (old.state, old.attempts) != (new.state, new.attempts):
                log.info(
                    "async_state",
                    request_id=request_id,
                    api=self.api,
                    state=new.state,
                    attempt=new.attempts,
                    **({"error": new.error} if new.error and new.state != CANCELLED else {}),
                )
            self.notify(new)
            return new

    async def start(self, request_id: str, attempt: int, payload: Blob) -> None:
        """IN_PROGRESS, attempt ``attempt``; writes the status if its submitter died first."""
        now = time.time()

        def change(old: Status | None) -> Status | None:
            if old is None:
                old = Status(
                    request_id,
                    self.api,
                    IN_QUEUE,
                    payload.version,
                    payload.content_type,
                    payload.modified,
                )
            if old.state in TERMINAL:
                return None
            return replace(old, state=IN_PROGRESS, attempts=attempt, started_at=now)

        await self.transition(request_id, change)

    async def retry(self, request_id: str, error: str) -> None:
        """Back to IN_QUEUE after a failed attempt, with its error."""

        def change(old: Status | None) -> Status | None:
            if old is None or old.state in TERMINAL:
                return None
            return replace(old, state=IN_QUEUE, error=error)

        await self.transition(request_id, change)

    async def finish(
        self,
        request_id: str,
        state: str,
        *,
        body: bytes = b"",
        content_type: str = "",
        error: str = "",
        attempts: int | None = None,
    ) -> Status | None:
        """Records the outcome unless one exists (the first one stands), brings the status in
        line with whichever outcome stands, and deletes the payload. Returns the status."""
        # in whole milliseconds, as S3's expiry metadata keeps it: every reader derives the same
        # finished_at from it (_ended)
        expires = round((time.time() + self.config.result_ttl) * 1000) / 1000
        now = expires - self.config.result_ttl
        if state != COMPLETED:
            body = json.dumps({"state": state, "error": error, "attempts": attempts}).encode()
            content_type = OUTCOME_TYPE
        key = self.key(request_id, "result")
        try:
            await self.store.put(
                key, body, content_type=content_type, if_absent=True, expires_at=expires
            )
            blob: Blob | None = Blob(key, body, "", content_type, now, expires)
        except AlreadyExists:
            blob = await self.store.get(key)
        status = await self.settle(request_id, blob) if blob is not None else None
        await self.store.delete(self.key(request_id, "payload"))
        return status

    async def settle(self, request_id: str, outcome: Blob) -> Status | None:
        """The status brought in line with an outcome that exists."""
        ttl = self.config.result_ttl
        return await self.transition(
            request_id, lambda old: _ended(old, outcome, ttl) if old else None
        )

    async def cancel(self, request_id: str) -> Status:
        status = await self.status(request_id)
        if status is None:
            raise NotFound(f"API {self.api!r} has no request {shown(request_id)}")
        if status.state in TERMINAL:
            raise FailedPrecondition(
                f"request {request_id} of API {self.api!r} already ended: {status.state}"
            )
        ended = await self.finish(request_id, CANCELLED, error="cancelled by a caller")
        assert ended is not None
        if ended.state != CANCELLED:  # it completed or failed meanwhile
            raise FailedPrecondition(
                f"request {request_id} of API {self.api!r} already ended: {ended.state}"
            )
        return ended

    async def page(self, *, states: set[str], size: int, token: str) -> tuple[list[Status], str]:
        """Statuses of one page of the listing (three keys per request)."""
        listing = await self.store.list(f"{self.api}/", limit=min(1000, size * 3), token=token)
        ids = [e.key.split("/")[-2] for e in listing.entries if e.key.endswith("/status")]
        found = await asyncio.gather(*(self.status(i) for i in ids))
        out = [s for s in found if s is not None and (not states or s.state in states)]
        return out, listing.next_token


class QueueCount:
    """How many requests the queue holds, for async.max_queued: its stats read at most every
    STATS_TTL, plus the requests this process queued since (exact enough for a limit that
    protects the queue; reading the stats on every Submit would cost a query that grows with
    the queue)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._at = -STATS_TTL
        self._count = 0

    async def queued(self) -> int:
        if time.monotonic() - self._at >= STATS_TTL:
            stats = await self.queue.stats()
            self._count, self._at = stats.queued, time.monotonic()
        return self._count

    def added(self) -> None:
        self._count += 1


class _Exists(GatewayError):
    """A client-chosen id taken by another payload."""

    code = grpc.StatusCode.ALREADY_EXISTS


async def _none() -> None:
    return None


def _ended(status: Status, outcome: Blob, ttl: float) -> Status:
    """``status`` after the outcome ``outcome`` (written with expires_at = its end + ``ttl``:
    exact on both stores, where S3's modification time has whole seconds)."""
    if status.state in TERMINAL:
        return status
    state, error = COMPLETED, ""
    if outcome.content_type == OUTCOME_TYPE:
        record = json.loads(outcome.body)
        state, error = record["state"], record.get("error", "")
    return replace(
        status,
        state=state,
        error=error,
        finished_at=outcome.modified if outcome.expires_at is None else outcome.expires_at - ttl,
        expires_at=outcome.expires_at,
    )

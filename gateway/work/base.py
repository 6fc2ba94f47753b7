"""The two interfaces of the work layer, a queue and a store, and what both backends share.

A :class:`Work` backend opens named :class:`Queue` objects and holds one :class:`Store`. The
embedded backend keeps both in SQLite plus files in a state folder; the AWS backend keeps them in
SQS and S3. Both pass one test suite, so a caller written against these classes behaves the same
on either; docs/work.md states the contract and where the backends differ (timing granularity,
exactness of counts).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import structlog

from modelmux_common.config import Seconds

log = structlog.get_logger("modelmux.work")

# Limits both backends enforce, so that what works embedded also works on SQS and S3.
MAX_MESSAGE_BYTES = 256 * 1024  # body plus attribute names and values, UTF-8
MAX_ATTRIBUTES = 10
MAX_VISIBILITY: Seconds = 12 * 3600.0
MAX_ENQUEUE_DELAY: Seconds = 15 * 60.0
MAX_KEY_BYTES = 900  # S3 allows 1024 including the store's prefix and the expiry index's
MAX_PAGE = 1000
MAX_RECEIVE = 10  # messages one receive call returns at most (SQS's own limit)
DEAD_SUFFIX = "-dead"

# 80 on SQS, less the dead-letter suffix and a queue prefix of up to 15
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,60}$")
# Characters SQS accepts in a message body; the embedded queue refuses the same others.
_BAD_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class WorkError(Exception):
    """Base of the errors the work layer raises on purpose."""


class Unavailable(WorkError):
    """The backend could not do the operation (unreachable, throttled, disk full, locked too
    long). The operation may or may not have taken effect; retrying it is safe."""


class Conflict(WorkError):
    """A conditional write or delete found the object in another state than the one required."""


class AlreadyExists(Conflict):
    """A create-if-absent found the key ``key`` taken."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key} exists")
        self.key = key


class LeaseLost(WorkError):
    """A renew found that the delivery it names is no longer the message's current one (its
    visibility lapsed and it went to another receiver, or it was deleted)."""


class QueueGone(WorkError):
    """The queue was dropped (or never created) under this handle."""


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery of a queued message. ``receipt`` names this delivery: a later delivery of the
    same message (same ``id``) has another receipt and a higher ``receive_count``."""

    id: str
    body: str
    receipt: str
    receive_count: int
    enqueued_at: float  # epoch seconds of the first enqueue
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """What a queue holds. Exact on the embedded backend; on SQS the counts are approximate and
    lag by up to a minute (SQS's own), and the oldest message's age is unknown (``None``)."""

    visible: int  # ready to be received (including messages whose lease lapsed)
    in_flight: int  # received, lease running
    delayed: int  # enqueued or released with a delay that has not passed yet
    dead: int  # in the dead-letter queue
    oldest_age: Seconds | None  # age of the oldest message not yet deleted, None when empty

    @property
    def queued(self) -> int:
        """Messages not yet done: what a ``max_queued`` limit compares with."""
        return self.visible + self.in_flight + self.delayed


@dataclass(frozen=True, slots=True)
class Blob:
    """A stored object with its body."""

    key: str
    body: bytes
    version: str  # changes whenever the content changes (the MD5 of the body on both backends)
    content_type: str
    modified: float  # epoch seconds of the last write
    expires_at: float | None  # when :meth:`Store.sweep` may delete it


@dataclass(frozen=True, slots=True)
class Entry:
    """A listed object, without its body."""

    key: str
    size: int
    version: str
    modified: float


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[Entry]
    next_token: str  # "" on the last page


class Queue(abc.ABC):
    """A durable queue with at-least-once delivery (docs/work.md, "Queue")."""

    def __init__(self, name: str, *, max_receive_count: int | None) -> None:
        self.name = name
        self.max_receive_count = max_receive_count

    @property
    @abc.abstractmethod
    def dead(self) -> Queue | None:
        """The dead-letter queue: where a message goes once it was received
        ``max_receive_count`` times and is visible again. ``None`` without a limit."""

    @abc.abstractmethod
    async def enqueue(
        self, body: str, *, delay: Seconds = 0.0, attributes: Mapping[str, str] | None = None
    ) -> str:
        """Stores one message durably and returns its id; ``delay`` keeps it hidden that long."""

    @abc.abstractmethod
    async def enqueue_many(
        self, bodies: Sequence[str], *, attributes: Mapping[str, str] | None = None
    ) -> list[str]:
        """Stores several messages (each with the same attributes); ids in the bodies' order.
        If it raises, any subset may have been stored: enqueueing them all again is the retry."""

    @abc.abstractmethod
    async def receive(
        self, *, max_messages: int = 1, visibility_timeout: Seconds, wait: Seconds = 0.0
    ) -> list[Message]:
        """Up to ``max_messages`` visible messages, oldest first, each hidden from other
        receivers for ``visibility_timeout``. Waits up to ``wait`` for the first one; cancelling
        the call returns at once and leaves nothing hidden."""

    @abc.abstractmethod
    async def renew(self, message: Message, *, visibility_timeout: Seconds) -> None:
        """Hides the message for ``visibility_timeout`` from now; :class:`LeaseLost` when the
        backend can tell this delivery is no longer current."""

    @abc.abstractmethod
    async def delete(self, message: Message) -> None:
        """Acknowledges the message: it is never delivered again. Deleting twice is harmless."""

    @abc.abstractmethod
    async def release(self, message: Message, *, delay: Seconds = 0.0) -> None:
        """Gives the message back, visible again after ``delay`` (a retry later). Its receive
        count is kept, so releases count towards the dead letter."""

    @abc.abstractmethod
    async def stats(self) -> QueueStats: ...


class Store(abc.ABC):
    """Objects under ``/``-separated keys (docs/work.md, "Store")."""

    @abc.abstractmethod
    async def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_absent: bool = False,
        if_version: str | None = None,
        expires_at: float | None = None,
    ) -> str:
        """Writes the object durably and returns its version. ``if_absent``: only if the key is
        free, else :class:`AlreadyExists`; ``if_version``: only if the current version is that
        one, else :class:`Conflict`. ``expires_at`` (epoch seconds) lets :meth:`sweep` delete it."""

    @abc.abstractmethod
    async def get(self, key: str) -> Blob | None: ...

    @abc.abstractmethod
    async def delete(self, key: str, *, if_version: str | None = None) -> None:
        """Deletes the object (absent is fine); with ``if_version`` only that version, else
        :class:`Conflict`."""

    @abc.abstractmethod
    async def list(self, prefix: str, *, limit: int = MAX_PAGE, token: str = "") -> Page:
        """Objects whose key starts with ``prefix``, in key order (by UTF-8 bytes), at most
        ``limit`` per page; pass ``next_token`` back for the next page."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Deletes every object under ``prefix``; returns how many there were."""

    @abc.abstractmethod
    async def sweep(self, *, now: float | None = None, limit: int = MAX_PAGE) -> int:
        """Deletes up to ``limit`` objects whose ``expires_at`` has passed; returns the count."""


@dataclass(frozen=True, slots=True)
class Put:
    """One create-if-absent write of :meth:`Work.enqueue_with`."""

    key: str
    body: bytes
    content_type: str = "application/octet-stream"
    expires_at: float | None = None


class Work(abc.ABC):
    """One backend: its store and its queues."""

    store: Store

    @abc.abstractmethod
    async def queue(self, name: str, *, max_receive_count: int | None = None) -> Queue:
        """The named queue, created when absent. ``max_receive_count`` (>= 1) gives it a
        dead-letter queue named ``<name>-dead``; the last opener's setting holds."""

    @abc.abstractmethod
    async def drop_queue(self, name: str) -> None:
        """Deletes the queue, its messages and its dead-letter queue."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def enqueue_with(
        self, queue: Queue, body: str, *, first: Sequence[Put], then: Sequence[Put] = ()
    ) -> str:
        """Creates the objects ``first``, enqueues ``body`` on ``queue``, creates ``then``, in
        that order (each put create-if-absent); returns the message id. A put that finds its key
        taken raises :class:`AlreadyExists` and stops there: what came before it stays, nothing
        after it is done. A crash leaves a prefix of the steps. Here each step is durable before
        the next starts; the embedded backend does all of them in one commit."""
        await self._put_all(first)
        message = await queue.enqueue(body)
        await self._put_all(then)
        return message

    async def _put_all(self, puts: Sequence[Put]) -> None:
        for put in puts:
            await self.store.put(
                put.key,
                put.body,
                content_type=put.content_type,
                if_absent=True,
                expires_at=put.expires_at,
            )

    async def __aenter__(self) -> Work:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# ---- checks both backends apply ------------------------------------------------------------


def check_queue_name(name: str) -> str:
    if not _QUEUE_NAME.match(name) or name.endswith(DEAD_SUFFIX):
        raise ValueError(
            f"queue name {name!r}: 1-60 letters, digits, '-' or '_', not ending in {DEAD_SUFFIX!r}"
        )
    return name


def queue_name(*parts: str) -> str:
    """A valid queue name from free-form parts (API names may hold dots, job ids are long):
    other characters become '-', and a short hash keeps names apart that this changed."""
    joined = "-".join(parts)
    clean = re.sub(r"[^A-Za-z0-9_-]", "-", joined)
    if clean == joined and 0 < len(clean) <= 60 and not clean.endswith(DEAD_SUFFIX):
        return clean
    digest = hashlib.sha256(joined.encode()).hexdigest()[:8]
    return f"{clean[:51]}-{digest}"


def check_max_receive_count(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= 1000:
        raise ValueError(f"max_receive_count {value}: expected 1 to 1000 (SQS's range)")
    return value


def check_message(body: str, attributes: Mapping[str, str] | None) -> dict[str, str]:
    attrs = dict(attributes or {})
    if len(attrs) > MAX_ATTRIBUTES:
        raise ValueError(f"{len(attrs)} message attributes: at most {MAX_ATTRIBUTES}")
    size = len(body.encode())
    for name, value in attrs.items():
        if not re.match(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,255}$", name) or not value:
            raise ValueError(
                f"message attribute {name!r}={value!r}: a simple name, a non-empty value"
            )
        size += len(name.encode()) + len(value.encode())
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {size} bytes: at most {MAX_MESSAGE_BYTES}")
    bad = _BAD_TEXT.search(body) or next(filter(None, map(_BAD_TEXT.search, attrs.values())), None)
    if bad:
        raise ValueError(f"message holds a character SQS refuses: {bad.group()!r}")
    return attrs


def check_duration(what: str, value: Seconds, *, high: Seconds) -> Seconds:
    if not (math.isfinite(value) and 0 <= value <= high):
        raise ValueError(f"{what} {value}: expected 0 to {high:g} s")
    return value


def check_key(key: str) -> str:
    if (
        not key
        or key.startswith(("/", "."))
        or "//" in key
        or any(part in (".", "..") for part in key.split("/"))
        or len(key.encode()) > MAX_KEY_BYTES
        or _BAD_TEXT.search(key)
        or any(ch < " " for ch in key)
    ):
        raise ValueError(
            f"store key {key!r}: '/'-separated, not starting with '/' or '.', no empty, '.' or "
            f"'..' parts, at most {MAX_KEY_BYTES} bytes, printable"
        )
    return key


def check_prefix(prefix: str) -> str:
    if prefix:
        check_key(prefix + "x")
    return prefix


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit {limit}: expected 1 to {MAX_PAGE}")
    return limit


def check_condition(if_absent: bool, if_version: str | None) -> None:
    if if_absent and if_version is not None:
        raise ValueError("a put is either if_absent or if_version, not both")


def content_version(body: bytes) -> str:
    """The version of a body: its MD5, as S3's ETag of a plain upload is."""
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


# ---- holding a message while work on it runs ------------------------------------------------


class Lease:
    """A held message: renewed in the background until the ``async with`` block ends.
    ``lost`` is set once a renew reports :class:`LeaseLost`; the work may then stop early."""

    def __init__(self, queue: Queue, message: Message, visibility_timeout: Seconds) -> None:
        self.queue = queue
        self.message = message
        self.visibility_timeout = visibility_timeout
        self.lost = asyncio.Event()
        self.error: WorkError | None = None

    async def _keep(self, every: Seconds) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.queue.renew(self.message, visibility_timeout=self.visibility_timeout)
            except (LeaseLost, QueueGone) as exc:
                log.warning("lease_lost", queue=self.queue.name, message=self.message.id)
                self.lost.set()
                self.error = exc
                return
            except Unavailable as exc:  # the next renew may get through before the lease ends
                log.warning("renew_failed", queue=self.queue.name, error=str(exc))


@contextlib.asynccontextmanager
async def holding(
    queue: Queue,
    message: Message,
    *,
    visibility_timeout: Seconds,
    renew_every: Seconds | None = None,
) -> AsyncIterator[Lease]:
    """Keeps ``message`` hidden while the block runs, renewing it every third of
    ``visibility_timeout`` (or ``renew_every``). The block still deletes or releases it."""
    lease = Lease(queue, message, visibility_timeout)
    keeper = asyncio.create_task(lease._keep(renew_every or visibility_timeout / 3))
    try:
        yield lease
    finally:
        keeper.cancel()
        # waits for the keeper without swallowing a cancellation of this task
        await asyncio.wait([keeper])
        if not keeper.cancelled() and (crash := keeper.exception()) is not None:
            log.error("renew_crashed", queue=queue.name, error=repr(crash))

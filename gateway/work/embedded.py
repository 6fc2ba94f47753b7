"""The embedded backend: queues and store in one SQLite database in a state folder, large
bodies in files beside it. No server; every process of one machine that opens the same folder
shares the same queues and objects (the gateway, its workers, ``modelmux worker`` processes).

A message's lease is a time in its row (``visible_at``) and a random receipt: a receiver that
dies holds nothing but that row, which becomes receivable again when the time passes. A waiting
receiver is woken at once by a message made visible in its own process, through its doorbell
(:mod:`gateway.work.doorbell`) by one from another process, by its own timer when a delay or a
lease it saw ends, and in any case every ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.work import threads
from gateway.work.base import (
    DEAD_SUFFIX,
    MAX_ENQUEUE_DELAY,
    MAX_RECEIVE,
    MAX_VISIBILITY,
    AlreadyExists,
    LeaseLost,
    Message,
    Put,
    Queue,
    QueueGone,
    QueueStats,
    Work,
    check_duration,
    check_key,
    check_max_receive_count,
    check_message,
    check_queue_name,
    log,
)
from gateway.work.doorbell import Doorbell
from gateway.work.embedded_store import INLINE_LIMIT, EmbeddedStore
from gateway.work.sqlite import Database
from modelmux_common.config import Seconds

MAX_WAIT: Seconds = 20.0  # as SQS's long poll, so callers written for one work on the other
# How often a waiting receiver looks anyway: rings make it wake sooner, this bounds a lost ring.
POLL_INTERVAL: Seconds = 0.5
DB_NAME = "work.sqlite3"


class _Bells:
    """Wakes receivers of this process when a message of their queue becomes visible."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[tuple[str, str], set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]]
        self._waiters = {}

    @contextlib.contextmanager
    def listen(self, key: tuple[str, str]) -> Iterator[asyncio.Event]:
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.setdefault(key, set()).add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiting = self._waiters.get(key, set())
                waiting.discard(entry)
                if not waiting:
                    self._waiters.pop(key, None)

    def ring(self, key: tuple[str, str]) -> None:
        with self._lock:
            waiting = list(self._waiters.get(key, ()))
        for loop, event in waiting:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(event.set)


_BELLS = _Bells()


@dataclass(frozen=True, slots=True)
class _Shared:
    """What every queue handle of one :class:`EmbeddedWork` uses."""

    db: Database
    doorbell: Doorbell
    poll_interval: Seconds

    def ring(self, queue: str) -> None:
        """After a commit that made messages of ``queue`` visible (blocking, in the pool)."""
        _BELLS.ring((str(self.db.path), queue))
        self.doorbell.ring(queue)


class EmbeddedQueue(Queue):
    def __init__(self, shared: _Shared, name: str, *, max_receive_count: int | None) -> None:
        super().__init__(name, max_receive_count=max_receive_count)
        self._shared = shared
        self._db = shared.db
        self._bell = (str(shared.db.path), name)
        self._dead = (
            EmbeddedQueue(shared, name + DEAD_SUFFIX, max_receive_count=None)
            if max_receive_count is not None
            else None
        )

    @property
    def dead(self) -> Queue | None:
        return self._dead

    @property
    def database(self) -> Database:
        return self._db

    async def enqueue(
        self, body: str, *, delay: Seconds = 0.0, attributes: Mapping[str, str] | None = None
    ) -> str:
        attrs = check_message(body, attributes)
        check_duration("delay", delay, high=MAX_ENQUEUE_DELAY)
        ids = await self._db.run(lambda conn: self._insert(conn, [body], attrs, delay))
        return ids[0]

    async def enqueue_many(
        self, bodies: Sequence[str], *, attributes: Mapping[str, str] | None = None
    ) -> list[str]:
        attrs: dict[str, str] = {}
        for body in bodies:
            attrs = check_message(body, attributes)
        return await self._db.run(lambda conn: self._insert(conn, list(bodies), attrs, 0.0))

    def _insert(
        self, conn: sqlite3.Connection, bodies: list[str], attrs: dict[str, str], delay: Seconds
    ) -> list[str]:
        with self._db.write(conn):
            ids = self.insert_rows(conn, bodies, attrs, delay)
        self._shared.ring(self.name)
        return ids

    def insert_rows(
        self, conn: sqlite3.Connection, bodies: list[str], attrs: dict[str, str], delay: Seconds
    ) -> list[str]:
        """Inside a write transaction: the messages' rows (ring the queue after the commit)."""
        now = time.time()
        ids = [uuid.uuid4().hex for _ in bodies]
        encoded = json.dumps(attrs)
        self._require(conn)
        conn.executemany(
            "INSERT INTO messages (queue, id, body, attributes, enqueued_at, visible_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (self.name, i, b, encoded, now, now + delay)
                for i, b in zip(ids, bodies, strict=True)
            ],
        )
        return ids

    def ring(self) -> None:
        self._shared.ring(self.name)

    def _require(self, conn: sqlite3.Connection) -> int | None:
        """The queue's max_receive_count as every process sees it; QueueGone once dropped."""
        row = conn.execute(
            "SELECT max_receive_count FROM queues WHERE name = ?", (self.name,)
        ).fetchone()
        if row is None:
            raise QueueGone(f"queue {self.name!r} does not exist")
        return row[0] if row[0] is None else int(row[0])

    async def receive(
        self, *, max_messages: int = 1, visibility_timeout: Seconds, wait: Seconds = 0.0
    ) -> list[Message]:
        if not 1 <= max_messages <= MAX_RECEIVE:
            raise ValueError(f"max_messages {max_messages}: expected 1 to {MAX_RECEIVE}")
        check_duration("visibility_timeout", visibility_timeout, high=MAX_VISIBILITY)
        check_duration("wait", wait, high=MAX_WAIT)
        if not self._shared.doorbell.listening:
            self._shared.doorbell.listen(lambda queue: _BELLS.ring((str(self._db.path), queue)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with _BELLS.listen(self._bell) as bell:
            while True:
                bell.clear()
                hint = [math.inf]  # when the next message becomes visible, by the claim's look
                got = await threads.claim(
                    lambda fn: self._db.run(lambda _conn: fn()),
                    functools.partial(self._claim, max_messages, visibility_timeout, hint),
                    undo=self._undo,
                    spawn=self._db.spawn,
                )
                left = deadline - loop.time()
                if got or left <= 0:
                    return got
                pause = min(left, self._shared.poll_interval, max(0.0, hint[0] - time.time()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await bell.wait()

    def _claim(self, count: int, lease: Seconds, hint: list[float]) -> list[Message]:
        conn = self._db.connection()
        now = time.time()
        # Most looks find nothing: a read without the write lock answers them.
        (soonest,) = conn.execute(
            "SELECT MIN(visible_at) FROM messages WHERE queue = ?", (self.name,)
        ).fetchone()
        if soonest is None or soonest > now:
            hint[0] = math.inf if soonest is None else soonest
            return []
        got: list[Message] = []
        with self._db.write(conn):
            limit = self._require(conn)
            while len(got) < count:
                rows = conn.execute(
                    "SELECT seq, id, body, attributes, enqueued_at, receive_count"
                    " FROM messages INDEXED BY messages_order"
                    " WHERE queue = ? AND visible_at <= ? ORDER BY seq LIMIT ?",
                    (self.name, now, count - len(got)),
                ).fetchall()
                if not rows:
                    break
                for seq, mid, body, attrs, enqueued_at, received in rows:
                    if limit is not None and received >= limit:
                        conn.execute(
                            "UPDATE messages SET queue = ?, visible_at = ?, receipt = NULL"
                            " WHERE seq = ?",
                            (self.name + DEAD_SUFFIX, now, seq),
                        )
                        log.info("dead_lettered", queue=self.name, message=mid, receives=received)
                        continue
                    receipt = uuid.uuid4().hex
                    conn.execute(
                        "UPDATE messages SET visible_at = ?, receipt = ?,"
                        " receive_count = receive_count + 1 WHERE seq = ?",
                        (now + lease, receipt, seq),
                    )
                    got.append(
                        Message(mid, body, receipt, received + 1, enqueued_at, json.loads(attrs))
                    )
        return got

    def _undo(self, messages: list[Message]) -> None:
        """Puts back messages claimed for a receiver that was gone by then: nobody saw them,
        so their receive count goes back too."""

        def put_back(conn: sqlite3.Connection) -> None:
            with self._db.write(conn):
                conn.executemany(
                    "UPDATE messages SET visible_at = ?, receipt = NULL,"
                    " receive_count = receive_count - 1 WHERE id = ? AND receipt = ?",
                    [(time.time(), m.id, m.receipt) for m in messages],
                )

        try:
            self._db.call(put_back)
        except Exception as exc:  # their lease lapses in time anyway
            log.warning("put_back_failed", queue=self.name, error=str(exc))
            return
        self._shared.ring(self.name)

    async def renew(self, message: Message, *, visibility_timeout: Seconds) -> None:
        check_duration("visibility_timeout", visibility_timeout, high=MAX_VISIBILITY)

        def extend(conn: sqlite3.Connection) -> int:
            with self._db.write(conn):
                return conn.execute(
                    "UPDATE messages SET visible_at = ? WHERE id = ? AND receipt = ?",
                    (time.time() + visibility_timeout, message.id, message.receipt),
                ).rowcount

        if not await self._db.run(extend):
            raise LeaseLost(f"message {message.id} was deleted or received again")

    async def delete(self, message: Message) -> None:
        def remove(conn: sqlite3.Connection) -> None:
            with self._db.write(conn):
                conn.execute("DELETE FROM messages WHERE id = ?", (message.id,))

        await self._db.run(remove)

    async def release(self, message: Message, *, delay: Seconds = 0.0) -> None:
        check_duration("delay", delay, high=MAX_VISIBILITY)

        def give_back(conn: sqlite3.Connection) -> None:
            with self._db.write(conn):
                conn.execute(
                    "UPDATE messages SET visible_at = ?, receipt = NULL"
                    " WHERE id = ? AND receipt = ?",
                    (time.time() + delay, message.id, message.receipt),
                )
            self._shared.ring(self.name)

        await self._db.run(give_back)

    async def stats(self) -> QueueStats:
        def count(conn: sqlite3.Connection) -> QueueStats:
            now = time.time()
            visible, in_flight, delayed = conn.execute(
                "SELECT COALESCE(SUM(visible_at <= :now), 0),"
                " COALESCE(SUM(visible_at > :now AND receipt IS NOT NULL), 0),"
                " COALESCE(SUM(visible_at > :now AND receipt IS NULL), 0)"
                " FROM messages WHERE queue = :queue",
                {"now": now, "queue": self.name},
            ).fetchone()
            dead = conn.execute(
                "SELECT COUNT(*) FROM messages WHERE queue = ?", (self.name + DEAD_SUFFIX,)
            ).fetchone()[0]
            oldest = conn.execute(
                "SELECT enqueued_at FROM messages WHERE queue = ? ORDER BY seq LIMIT 1",
                (self.name,),
            ).fetchone()
            age = max(0.0, now - oldest[0]) if oldest else None
            return QueueStats(visible, in_flight, delayed, dead if self._dead else 0, age)

        return await self._db.run(count)


class EmbeddedWork(Work):
    """Queues and store in ``folder`` (created when absent)."""

    store: EmbeddedStore

    def __init__(
        self,
        folder: Path,
        *,
        poll_interval: Seconds = POLL_INTERVAL,
        inline_limit: int = INLINE_LIMIT,
        busy_timeout: Seconds = 10.0,
    ) -> None:
        self.folder = folder
        self._db = Database(folder / DB_NAME, busy_timeout=busy_timeout)
        self._shared = _Shared(self._db, Doorbell(folder), poll_interval)
        self.store = EmbeddedStore(self._db, folder / "blobs", inline_limit=inline_limit)

    async def queue(self, name: str, *, max_receive_count: int | None = None) -> Queue:
        check_queue_name(name)
        check_max_receive_count(max_receive_count)

        def declare(conn: sqlite3.Connection) -> None:
            with self._db.write(conn):
                conn.execute(
                    "INSERT INTO queues (name, max_receive_count) VALUES (?, ?) ON CONFLICT (name)"
                    " DO UPDATE SET max_receive_count = excluded.max_receive_count",
                    (name, max_receive_count),
                )
                if max_receive_count is not None:
                    conn.execute(
                        "INSERT OR IGNORE INTO queues (name) VALUES (?)", (name + DEAD_SUFFIX,)
                    )

        await self._db.run(declare)
        return EmbeddedQueue(self._shared, name, max_receive_count=max_receive_count)

    async def drop_queue(self, name: str) -> None:
        check_queue_name(name)
        names = (name, name + DEAD_SUFFIX)

        def drop(conn: sqlite3.Connection) -> None:
            with self._db.write(conn):
                conn.execute("DELETE FROM messages WHERE queue IN (?, ?)", names)
                conn.execute("DELETE FROM queues WHERE name IN (?, ?)", names)

        await self._db.run(drop)

    async def enqueue_with(
        self, queue: Queue, body: str, *, first: Sequence[Put], then: Sequence[Put] = ()
    ) -> str:
        """As :meth:`Work.enqueue_with`, in one transaction: one commit, one fsync."""
        if not isinstance(queue, EmbeddedQueue) or queue.database is not self._db:
            return await super().enqueue_with(queue, body, first=first, then=then)
        attrs = check_message(body, None)
        for put in (*first, *then):
            check_key(put.key)
        return await self._db.run(
            lambda conn: self._enqueue_with(conn, queue, body, attrs, first, then)
        )

    def _enqueue_with(
        self,
        conn: sqlite3.Connection,
        queue: EmbeddedQueue,
        body: str,
        attrs: dict[str, str],
        first: Sequence[Put],
        then: Sequence[Put],
    ) -> str:
        store = self.store
        files = [store.body_file(put.body) for put in (*first, *then)]
        done, message, taken = 0, "", None
        try:
            with self._db.write(conn):
                try:
                    for put, file in zip(first, files, strict=False):
                        self._create(conn, put, file)
                        done += 1
                    [message] = queue.insert_rows(conn, [body], attrs, 0.0)
                    for put, file in zip(then, files[len(first) :], strict=True):
                        self._create(conn, put, file)
                        done += 1
                except AlreadyExists as exc:  # what came before it is committed
                    taken = exc
        except BaseException:
            store.unlink(files)
            raise
        store.unlink(files[done:])
        if message:
            queue.ring()
        if taken is not None:
            raise taken
        return message

    def _create(self, conn: sqlite3.Connection, put: Put, file: str | None) -> None:
        self.store.write_row(
            conn,
            put.key,
            put.body,
            file,
            content_type=put.content_type,
            condition=(True, None),
            expires_at=put.expires_at,
        )

    async def close(self) -> None:
        self._shared.doorbell.close()
        await asyncio.get_running_loop().run_in_executor(None, self._db.close)


async def open_embedded(
    folder: Path,
    *,
    poll_interval: Seconds = POLL_INTERVAL,
    inline_limit: int = INLINE_LIMIT,
    busy_timeout: Seconds = 10.0,
) -> EmbeddedWork:
    """The embedded backend in ``folder``, its database created or upgraded."""
    work = EmbeddedWork(
        folder, poll_interval=poll_interval, inline_limit=inline_limit, busy_timeout=busy_timeout
    )
    await work._db.run(lambda _conn: work._db.create())
    await work.store.prepare()
    return work

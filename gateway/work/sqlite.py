"""The embedded backend's SQLite database: one file shared by the processes of one machine.

WAL journal with ``synchronous=FULL``: a commit returns after the log is fsynced, so what it
wrote survives kill -9 and power loss. Readers never block writers; writers take the write lock
up front (``BEGIN IMMEDIATE``) and wait up to ``busy_timeout`` for another process's writer, so a
read-then-write transaction never fails half-way for a lock. A process killed inside a
transaction holds nothing afterwards: the kernel drops its file locks and SQLite ignores the
uncommitted part of the log.

Blocking calls run in a small thread pool of this object's own; each thread keeps one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.work.base import Unavailable
from modelmux_common.config import Seconds

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    max_receive_count INTEGER
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    attributes TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT
);
CREATE INDEX IF NOT EXISTS messages_order ON messages (queue, seq, visible_at);
CREATE INDEX IF NOT EXISTS messages_visible ON messages (queue, visible_at);
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    body BLOB,
    file TEXT,
    modified REAL NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS objects_expiry ON objects (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS objects_file ON objects (file) WHERE file IS NOT NULL;
"""


# One lock per database file and process, shared by every Database object opened on it.
_REGISTRY = threading.Lock()
_WRITE_LOCKS: dict[str, threading.Lock] = {}


class Database:
    """``work.sqlite3`` in a state folder."""

    def __init__(self, path: Path, *, busy_timeout: Seconds = 10.0, threads: int = 4) -> None:
        self.path = path.absolute()
        with _REGISTRY:
            self._writing = _WRITE_LOCKS.setdefault(str(self.path), threading.Lock())
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="work-sqlite")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    def _connect(self) -> sqlite3.Connection:
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.path.parent.parent)  # the new folder's own entry
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
            check_same_thread=False,  # used by one thread only; closed by close()
        )
        conn.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._connections.append(conn)
        return conn

    def connection(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def create(self) -> None:
        """Creates the file and its tables (blocking; any process may do it, any time)."""
        conn = self.connection()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise Unavailable(f"{self.path}: cannot use a WAL journal (got {mode})")
        with self.write(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise Unavailable(f"{self.path}: schema {version} is newer than this modelmux")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(connection)`` in the pool; SQLite failures become :class:`Unavailable`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.call, fn)

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self.connection())
        except (sqlite3.Error, OSError) as exc:  # locked too long, disk full, I/O error
            raise Unavailable(f"{self.path}: {exc}") from exc

    @contextlib.contextmanager
    def write(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the database's write lock from its start. Writers of
        this process queue on a lock first: SQLite's own wait for a busy database sleeps in
        steps of up to 100 ms, which only writers in other processes should ever meet."""
        with self._writing:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # some errors (a full disk) already rolled it back
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def spawn(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` in the pool, nobody waiting for it."""
        with contextlib.suppress(RuntimeError):  # the pool is shut down: the process is ending
            self._executor.submit(fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


def fsync_dir(path: Path) -> None:
    """Makes the entries of folder ``path`` (files created, renamed, removed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

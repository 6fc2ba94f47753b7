"""The embedded store: objects as rows of the work database; bodies above ``inline_limit`` in
files under ``blobs/``.

A body file gets a fresh unique name, is written, fsynced, and its folder fsynced, before the row
that names it is committed; so a committed row never names a missing or partial file, and no file
is ever replaced in place. A file whose row was never committed (the writer died in between) or
was since replaced or deleted is an orphan: deleted right after the commit that orphaned it, and,
if the process died first, by :meth:`EmbeddedStore.sweep` once it is an hour old.
"""

from __future__ import annotations

import base64
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from gateway.work.base import (
    MAX_PAGE,
    AlreadyExists,
    Blob,
    Conflict,
    Entry,
    Page,
    Store,
    check_condition,
    check_key,
    check_limit,
    check_prefix,
    content_version,
    log,
)
from gateway.work.sqlite import Database, fsync_dir
from modelmux_common.config import Seconds

INLINE_LIMIT = 128 * 1024  # SQLite reads and writes blobs below ~100 KB faster than files
ORPHAN_AGE: Seconds = 3600.0
_READ_ATTEMPTS = 5


def _after(prefix: str) -> str | None:
    """The least string greater than every string starting with ``prefix`` (None: no bound)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


class EmbeddedStore(Store):
    def __init__(self, db: Database, blobs: Path, *, inline_limit: int) -> None:
        self._db = db
        self._blobs = blobs
        self._inline_limit = inline_limit
        self._orphans_checked = -math.inf  # monotonic time of the last look for orphans

    async def prepare(self) -> None:
        def make() -> None:
            if not self._blobs.is_dir():
                self._blobs.mkdir(parents=True, exist_ok=True)
                fsync_dir(self._blobs.parent)

        await self._db.run(lambda _conn: make())

    # ---- body files -------------------------------------------------------------------------

    def _write_file(self, body: bytes) -> str:
        name = uuid.uuid4().hex
        folder = self._blobs / name[:2]
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            fsync_dir(self._blobs)
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(folder)
        return f"{name[:2]}/{name}"

    def _unlink(self, files: Iterable[str | None]) -> None:
        for file in files:
            if file:
                try:
                    (self._blobs / file).unlink(missing_ok=True)
                except OSError as exc:  # an orphan: the sweep retries it
                    log.warning("blob_unlink_failed", file=file, error=str(exc))

    # ---- operations -------------------------------------------------------------------------

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
        check_key(key)
        check_condition(if_absent, if_version)
        body = bytes(body)
        return await self._db.run(
            lambda conn: self._put(
                conn,
                key,
                body,
                content_type=content_type,
                condition=(if_absent, if_version),
                expires_at=expires_at,
            )
        )

    def _put(
        self,
        conn: sqlite3.Connection,
        key: str,
        body: bytes,
        *,
        content_type: str,
        condition: tuple[bool, str | None],
        expires_at: float | None,
    ) -> str:
        version = content_version(body)
        file = self.body_file(body)
        try:
            with self._db.write(conn):
                old = self.write_row(
                    conn,
                    key,
                    body,
                    file,
                    content_type=content_type,
                    condition=condition,
                    expires_at=expires_at,
                )
        except BaseException:
            self._unlink([file])
            raise
        self._unlink([old])
        return version

    def body_file(self, body: bytes) -> str | None:
        """The file that will hold ``body`` (written and fsynced), None to keep it in its row."""
        return self._write_file(body) if len(body) > self._inline_limit else None

    def write_row(
        self,
        conn: sqlite3.Connection,
        key: str,
        body: bytes,
        file: str | None,
        *,
        content_type: str,
        condition: tuple[bool, str | None],
        expires_at: float | None,
    ) -> str | None:
        """Inside a write transaction: the object's row, its body in ``file`` when given (from
        :meth:`body_file`); returns the file the row named before, to unlink after the commit."""
        row = conn.execute("SELECT version, file FROM objects WHERE key = ?", (key,))
        current = row.fetchone()
        _check(key, current[0] if current else None, *condition)
        conn.execute(
            "INSERT OR REPLACE INTO objects"
            " (key, version, content_type, size, body, file, modified, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                content_version(body),
                content_type,
                len(body),
                None if file else body,
                file,
                time.time(),
                expires_at,
            ),
        )
        return current[1] if current else None

    def unlink(self, files: Iterable[str | None]) -> None:
        self._unlink(files)

    async def get(self, key: str) -> Blob | None:
        check_key(key)
        return await self._db.run(lambda conn: self._get(conn, key))

    def _get(self, conn: sqlite3.Connection, key: str) -> Blob | None:
        for _ in range(_READ_ATTEMPTS):
            row = conn.execute(
                "SELECT version, content_type, body, file, modified, expires_at FROM objects"
                " WHERE key = ?",
                (key,),
            ).fetchone()
            if row is None:
                return None
            version, content_type, body, file, modified, expires_at = row
            if file:
                try:
                    body = (self._blobs / file).read_bytes()
                except FileNotFoundError:  # replaced or deleted since the row was read
                    continue
            return Blob(key, bytes(body), version, content_type, modified, expires_at)
        raise Conflict(f"{key} kept changing while it was read")

    async def delete(self, key: str, *, if_version: str | None = None) -> None:
        check_key(key)

        def remove(conn: sqlite3.Connection) -> None:
            with self._db.write(conn):
                row = conn.execute("SELECT version, file FROM objects WHERE key = ?", (key,))
                current = row.fetchone()
                if if_version is not None:
                    _check(key, current[0] if current else None, False, if_version)
                conn.execute("DELETE FROM objects WHERE key = ?", (key,))
            self._unlink([current[1] if current else None])

        await self._db.run(remove)

    async def list(self, prefix: str, *, limit: int = MAX_PAGE, token: str = "") -> Page:
        check_prefix(prefix)
        check_limit(limit)
        start = base64.urlsafe_b64decode(token.encode()).decode() if token else ""

        def page(conn: sqlite3.Connection) -> Page:
            sql = "SELECT key, size, version, modified FROM objects WHERE key >= ? AND key > ?"
            args: list[object] = [prefix, start]
            if (upper := _after(prefix)) is not None:
                sql += " AND key < ?"
                args.append(upper)
            rows = conn.execute(sql + " ORDER BY key LIMIT ?", [*args, limit + 1]).fetchall()
            entries = [Entry(k, size, v, m) for k, size, v, m in rows[:limit]]
            more = len(rows) > limit
            last = entries[-1].key.encode() if more else b""
            return Page(entries, base64.urlsafe_b64encode(last).decode() if more else "")

        return await self._db.run(page)

    async def delete_prefix(self, prefix: str) -> int:
        check_prefix(prefix)

        def remove(conn: sqlite3.Connection) -> int:
            where, args = "key >= ?", [prefix]
            if (upper := _after(prefix)) is not None:
                where, args = where + " AND key < ?", [*args, upper]
            with self._db.write(conn):
                files = [
                    f for (f,) in conn.execute(f"SELECT file FROM objects WHERE {where}", args)
                ]
                count = conn.execute(f"DELETE FROM objects WHERE {where}", args).rowcount
            self._unlink(files)
            return int(count)

        return await self._db.run(remove)

    async def sweep(self, *, now: float | None = None, limit: int = MAX_PAGE) -> int:
        check_limit(limit)
        cutoff = time.time() if now is None else now

        def remove(conn: sqlite3.Connection) -> int:
            with self._db.write(conn):
                rows = conn.execute(
                    "SELECT key, file FROM objects WHERE expires_at <= ? LIMIT ?", (cutoff, limit)
                ).fetchall()
                conn.executemany(
                    "DELETE FROM objects WHERE key = ? AND expires_at <= ?",
                    [(key, cutoff) for key, _ in rows],
                )
            self._unlink(file for _, file in rows)
            self._remove_orphans(conn)
            return len(rows)

        return await self._db.run(remove)

    def _remove_orphans(self, conn: sqlite3.Connection) -> None:
        """Deletes body files no row names, an hour after they were written (a quarter of
        that at most between two looks: a look lists every file)."""
        if time.monotonic() - self._orphans_checked < ORPHAN_AGE / 4:
            return
        self._orphans_checked = time.monotonic()
        cutoff = time.time() - ORPHAN_AGE
        for path in self._blobs.glob("*/*"):
            try:
                old = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            name = f"{path.parent.name}/{path.name}"
            if old and not conn.execute("SELECT 1 FROM objects WHERE file = ?", (name,)).fetchone():
                log.info("blob_orphan_removed", file=name)
                self._unlink([name])


def _check(key: str, current: str | None, if_absent: bool, if_version: str | None) -> None:
    if if_absent and current is not None:
        raise AlreadyExists(key)
    if if_version is not None and current != if_version:
        raise Conflict(f"{key} is at version {current}, not {if_version}")

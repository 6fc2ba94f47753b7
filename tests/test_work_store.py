"""The work layer's store, one suite for both backends: embedded (SQLite and files in a tmp
folder) and S3 on moto's server over loopback HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from modelsync_helpers import MotoServer
from work_helpers import KINDS, Backend, backend_for, moto_fixture

from gateway.work import (
    AlreadyExists,
    AwsConfig,
    Conflict,
    Put,
    Unavailable,
    open_aws,
    open_embedded,
)
from gateway.work.base import Store


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_fixture(tmp_path_factory)


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with backend_for(request, tmp_path) as b:
        yield b


async def test_put_get_and_versions(backend: Backend) -> None:
    store = backend.work.store
    v1 = await store.put("iris/r1/payload", b'{"x": 1}', content_type="application/json")
    assert v1 == hashlib.md5(b'{"x": 1}').hexdigest()
    got = await store.get("iris/r1/payload")
    assert got is not None
    assert (got.body, got.version, got.content_type) == (b'{"x": 1}', v1, "application/json")
    assert abs(got.modified - time.time()) < 60 and got.expires_at is None
    assert await store.get("iris/r2/payload") is None
    # overwriting with the same bytes keeps the version, as S3's ETag does
    assert await store.put("iris/r1/payload", b'{"x": 1}') == v1


async def test_create_if_absent_and_compare_and_swap(backend: Backend) -> None:
    store = backend.work.store
    v1 = await store.put("jobs/j1/state", b"running", if_absent=True)
    with pytest.raises(AlreadyExists):
        await store.put("jobs/j1/state", b"other", if_absent=True)
    with pytest.raises(Conflict):
        await store.put("jobs/j1/state", b"done", if_version="0" * 32)
    v2 = await store.put("jobs/j1/state", b"done", if_version=v1)
    with pytest.raises(Conflict):  # v1 is gone
        await store.put("jobs/j1/state", b"again", if_version=v1)
    with pytest.raises(Conflict):
        await store.put("jobs/none/state", b"x", if_version=v1)
    got = await store.get("jobs/j1/state")
    assert got is not None and (got.body, got.version) == (b"done", v2)


async def test_delete_conditionally_and_twice(backend: Backend) -> None:
    store = backend.work.store
    v1 = await store.put("a/b", b"1")
    with pytest.raises(Conflict):
        await store.delete("a/b", if_version="0" * 32)
    await store.delete("a/b", if_version=v1)
    assert await store.get("a/b") is None
    await store.delete("a/b")  # absent is fine
    with pytest.raises(Conflict):
        await store.delete("a/b", if_version=v1)


async def test_large_bodies_round_trip(backend: Backend) -> None:
    store = backend.work.store
    big = bytes(range(256)) * 2048  # 512 KiB: a file beside the database when embedded
    version = await store.put("iris/r1/result", big)
    got = await store.get("iris/r1/result")
    assert got is not None and got.body == big and got.version == version
    await store.put("iris/r1/result", big[::-1])
    got = await store.get("iris/r1/result")
    assert got is not None and got.body == big[::-1]
    await store.delete("iris/r1/result")
    assert await store.get("iris/r1/result") is None
    if backend.kind == "embedded":  # no file left behind by the overwrite or the delete
        assert not [p for p in (Path(backend.spec["folder"]) / "blobs").rglob("*") if p.is_file()]


async def _all_keys(store: Store, prefix: str, limit: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        page = await store.list(prefix, limit=limit, token=token)
        pages.append([e.key for e in page.entries])
        if not page.next_token:
            return pages
        token = page.next_token


async def test_list_pages_in_key_order(backend: Backend) -> None:
    store = backend.work.store
    keys = [f"iris/{i:03d}/status" for i in range(25)]
    for key in reversed(keys):
        await store.put(key, key.encode())
    for other in ("irisx/1", "iri", "other/iris/1"):
        await store.put(other, b"-")
    pages = await _all_keys(store, "iris/", limit=10)
    assert [len(p) for p in pages] == [10, 10, 5]
    assert list(itertools.chain(*pages)) == keys
    page = await store.list("iris/007", limit=5)
    assert [e.key for e in page.entries] == ["iris/007/status"] and page.next_token == ""
    assert page.entries[0].size == len(b"iris/007/status")
    assert (await store.list("nothing/")).entries == []
    everything = list(itertools.chain(*await _all_keys(store, "", limit=1000)))
    assert everything == sorted([*keys, "irisx/1", "iri", "other/iris/1"])


async def test_delete_prefix(backend: Backend) -> None:
    store = backend.work.store
    for i in range(12):
        await store.put(f"jobs/j1/batches/{i}", b"ok")
    await store.put("jobs/j10/state", b"keep")
    assert await store.delete_prefix("jobs/j1/") == 12
    assert [e.key for e in (await store.list("jobs/")).entries] == ["jobs/j10/state"]


async def test_sweep_deletes_what_expired_and_nothing_else(backend: Backend) -> None:
    store = backend.work.store
    now = time.time()
    await store.put("r/expired", b"1", expires_at=now - 10)
    await store.put("r/later", b"2", expires_at=now + 3600)
    await store.put("r/rewritten", b"3", expires_at=now - 10)
    await store.put("r/rewritten", b"3 again")  # no expiry any more
    await store.put("r/forever", b"4")
    later = await store.get("r/later")
    assert later is not None and later.expires_at == pytest.approx(now + 3600, abs=0.01)
    assert await store.sweep() == 1
    assert [e.key for e in (await store.list("r/")).entries] == [
        "r/forever",
        "r/later",
        "r/rewritten",
    ]
    assert await store.sweep() == 0
    assert await store.sweep(now=now + 3601) == 1
    assert [e.key for e in (await store.list("r/")).entries] == ["r/forever", "r/rewritten"]


async def test_create_if_absent_racing_in_threads_has_one_winner(backend: Backend) -> None:
    store = backend.work.store

    async def attempt(key: str, me: int) -> int | None:
        try:
            await store.put(key, f"writer {me}".encode(), if_absent=True)
        except AlreadyExists:
            return None
        return me

    for round_ in range(5):
        key = f"hooks/j{round_}/ran"
        results = await asyncio.gather(*(attempt(key, me) for me in range(16)))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        got = await store.get(key)
        assert got is not None and got.body == f"writer {winners[0]}".encode()


async def test_bad_keys_are_refused(backend: Backend) -> None:
    for key in ("", "/a", ".expiry/x", "a//b", "a/../b", "a/./b", "a\nb", "x" * 1000):
        with pytest.raises(ValueError):
            await backend.work.store.put(key, b"x")
    with pytest.raises(ValueError):
        await backend.work.store.put("a", b"x", if_absent=True, if_version="v")


async def test_embedded_sweep_removes_orphaned_body_files(tmp_path: Path) -> None:
    """A body file whose row never committed (the writer died in between) goes once it is an
    hour old; a younger one may still be a write in progress and stays."""
    work = await open_embedded(tmp_path / "state")
    try:
        await work.store.put("kept/big", b"k" * 300_000)
        blobs = tmp_path / "state" / "blobs"
        (blobs / "ee").mkdir(exist_ok=True)
        old, young = blobs / "ee" / "old-orphan", blobs / "ee" / "young-orphan"
        old.write_bytes(b"o" * 300_000)
        young.write_bytes(b"y" * 300_000)
        hours_ago = time.time() - 7200
        os.utime(old, (hours_ago, hours_ago))
        assert await work.store.sweep() == 0
        assert not old.exists() and young.exists()
        kept = await work.store.get("kept/big")
        assert kept is not None and kept.body == b"k" * 300_000
    finally:
        await work.close()


async def test_open_aws_names_a_bucket_it_cannot_use(moto: MotoServer) -> None:
    config = AwsConfig(bucket="no-such-bucket-here", endpoint_url=moto.endpoint, region="us-east-1")
    with pytest.raises(Unavailable, match="s3://no-such-bucket-here"):
        await open_aws(config)


async def test_enqueue_with_stores_first_message_then(backend: Backend) -> None:
    q = await backend.work.queue("submits")
    first = [Put("r/1/payload", b"body", "text/plain")]
    then = [Put("r/1/status", b"{}", "application/json")]
    await backend.work.enqueue_with(q, "1", first=first, then=then)
    [message] = await q.receive(visibility_timeout=30)
    assert message.body == "1"
    payload, status = (
        await backend.work.store.get("r/1/payload"),
        await backend.work.store.get("r/1/status"),
    )
    assert payload is not None and (payload.body, payload.content_type) == (b"body", "text/plain")
    assert status is not None and status.body == b"{}"


async def test_enqueue_with_stops_at_a_taken_key_keeping_what_came_before(
    backend: Backend,
) -> None:
    q = await backend.work.queue("submits")
    await backend.work.store.put("r/2/payload", b"old")
    with pytest.raises(AlreadyExists) as taken:
        await backend.work.enqueue_with(
            q, "2", first=[Put("r/2/payload", b"new")], then=[Put("r/2/status", b"{}")]
        )
    assert taken.value.key == "r/2/payload"
    assert await q.receive(visibility_timeout=30) == []
    assert await backend.work.store.get("r/2/status") is None
    await backend.work.store.put("r/3/status", b"taken")
    big = b"x" * 300_000  # a body file on the embedded store
    with pytest.raises(AlreadyExists) as taken:
        await backend.work.enqueue_with(
            q, "3", first=[Put("r/3/payload", big)], then=[Put("r/3/status", b"{}")]
        )
    assert taken.value.key == "r/3/status"
    [message] = await q.receive(visibility_timeout=30)
    assert message.body == "3"
    stored = await backend.work.store.get("r/3/payload")
    assert stored is not None and stored.body == big
    status = await backend.work.store.get("r/3/status")
    assert status is not None and status.body == b"taken"

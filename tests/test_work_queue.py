"""The work layer's queue, one suite for both backends: embedded (SQLite in a tmp folder) and SQS
on moto's server over loopback HTTP. Lapses are waited for with receive's own long poll (bounded),
never with sleeps."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from modelsync_helpers import MotoServer, wait_until
from work_helpers import KINDS, Backend, backend_for, moto_fixture

from gateway.work import LeaseLost, Message, holding, queue_name
from gateway.work.threads import claim


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_fixture(tmp_path_factory)


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with backend_for(request, tmp_path) as b:
        yield b


async def test_receive_gives_oldest_first(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    ids = [await q.enqueue(f"m{i}") for i in range(5)]
    first = await q.receive(max_messages=3, visibility_timeout=30)
    rest = await q.receive(max_messages=10, visibility_timeout=30)
    assert [m.body for m in first + rest] == [f"m{i}" for i in range(5)]
    assert [m.id for m in first + rest] == ids
    assert all(m.receive_count == 1 for m in first + rest)
    assert await q.receive(visibility_timeout=30) == []
    for m in first + rest:
        await q.delete(m)


async def test_enqueue_many_keeps_order_and_attributes(backend: Backend) -> None:
    q = await backend.work.queue("batches")
    bodies = [f"batch {i}" for i in range(23)]  # more than one SQS batch of 10
    ids = await q.enqueue_many(bodies, attributes={"job": "j1"})
    assert len(set(ids)) == 23
    got: list[Message] = []
    while len(got) < 23:
        more = await q.receive(max_messages=10, visibility_timeout=30, wait=2)
        assert more, f"only {len(got)} of 23 came back"
        got += more
    assert [m.body for m in got] == bodies
    assert {m.attributes["job"] for m in got} == {"j1"}


async def test_lapsed_lease_redelivers_with_rising_receive_count(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    mid = await q.enqueue("work")
    receipts = set()
    for count in (1, 2, 3):
        got = await q.receive(visibility_timeout=backend.tick, wait=backend.tick + 5)
        assert [(m.id, m.receive_count) for m in got] == [(mid, count)]
        receipts.add(got[0].receipt)
        if count == 1:  # hidden while its lease runs
            assert await q.receive(visibility_timeout=backend.tick) == []
    assert len(receipts) == 3


async def test_renew_keeps_a_message_hidden_past_its_first_lease(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    await q.enqueue("long work")
    [m] = await q.receive(visibility_timeout=backend.tick)
    await q.renew(m, visibility_timeout=backend.tick * 4)
    # two first leases long: nothing comes back
    assert await q.receive(visibility_timeout=backend.tick, wait=backend.tick * 2) == []
    await q.delete(m)


async def test_holding_renews_while_work_runs(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    await q.enqueue("long work")
    [m] = await q.receive(visibility_timeout=backend.tick * 2)
    async with holding(q, m, visibility_timeout=backend.tick * 2) as lease:
        # the lease would have lapsed twice over without the renewals
        assert await q.receive(visibility_timeout=backend.tick, wait=backend.tick * 3) == []
        assert not lease.lost.is_set()
        await q.delete(m)


async def test_release_with_delay_retries_later(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    await q.enqueue("flaky")
    [m] = await q.receive(visibility_timeout=30)
    start = time.monotonic()
    await q.release(m, delay=backend.tick * 2)
    assert await q.receive(visibility_timeout=30) == []
    [again] = await q.receive(visibility_timeout=30, wait=backend.tick * 2 + 5)
    assert time.monotonic() - start >= backend.tick * 2 - 0.05
    assert (again.id, again.receive_count) == (m.id, 2)
    await q.release(again)  # no delay: visible at once
    [third] = await q.receive(visibility_timeout=30, wait=2)
    assert third.receive_count == 3


async def test_dead_letter_after_max_receives(backend: Backend) -> None:
    q = await backend.work.queue("jobs", max_receive_count=2)
    assert q.dead is not None
    mid = await q.enqueue("poison", attributes={"job": "j7"})
    for count in (1, 2):
        [m] = await q.receive(visibility_timeout=30, wait=2)
        assert m.receive_count == count
        await q.release(m)
    # the third receive finds it past its limit and moves it
    assert await q.receive(visibility_timeout=30, wait=backend.tick) == []
    stats = await q.stats()
    assert (stats.visible, stats.in_flight, stats.dead) == (0, 0, 1)
    [dead] = await q.dead.receive(visibility_timeout=30, wait=2)
    assert (dead.id, dead.body, dead.attributes) == (mid, "poison", {"job": "j7"})
    await q.dead.delete(dead)
    assert (await q.stats()).dead == 0


async def test_stats_count_visible_in_flight_and_delayed(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    for i in range(3):
        await q.enqueue(f"m{i}")
    await q.enqueue("later", delay=60)
    [m] = await q.receive(visibility_timeout=30)
    stats = await q.stats()
    assert (stats.visible, stats.in_flight, stats.delayed, stats.dead) == (2, 1, 1, 0)
    assert stats.queued == 4
    if backend.kind == "embedded":
        assert stats.oldest_age is not None and 0 <= stats.oldest_age < 30
    else:
        assert stats.oldest_age is None  # SQS does not tell
    await q.delete(m)
    assert (await q.stats()).queued == 3


async def test_delete_is_final_and_idempotent(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    await q.enqueue("once")
    [m] = await q.receive(visibility_timeout=backend.tick)
    await q.delete(m)
    await q.delete(m)
    with pytest.raises(LeaseLost):
        await q.renew(m, visibility_timeout=30)
    assert await q.receive(visibility_timeout=30, wait=backend.tick * 2) == []


# embedded only: SQS cannot tell a stale receipt from the current one (docs/work.md)
@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_renew_of_a_delivery_taken_over_raises_lease_lost(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    await q.enqueue("slow")
    [old] = await q.receive(visibility_timeout=backend.tick)
    [new] = await q.receive(visibility_timeout=30, wait=backend.tick + 5)
    with pytest.raises(LeaseLost):
        await q.renew(old, visibility_timeout=30)
    await q.release(old)  # a stale release leaves the current lease alone
    assert await q.receive(visibility_timeout=30) == []
    await q.delete(new)


async def test_cancelled_receive_returns_at_once_and_hides_nothing(backend: Backend) -> None:
    q = await backend.work.queue("jobs")
    waiting = asyncio.create_task(q.receive(visibility_timeout=300, wait=15))
    for _ in range(20):
        await asyncio.sleep(0)
    start = time.monotonic()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert time.monotonic() - start < 0.5
    # an SQS long poll still running in its thread may take this message; it is put back
    mid = await q.enqueue("after shutdown")
    got = await q.receive(visibility_timeout=30, wait=15)
    assert [m.id for m in got] == [mid]


async def test_queues_are_separate_and_droppable(backend: Backend) -> None:
    a = await backend.work.queue("a", max_receive_count=3)
    b = await backend.work.queue("b")
    await a.enqueue("for a")
    assert await b.receive(visibility_timeout=30) == []
    await backend.work.drop_queue("a")
    again = await backend.work.queue("a2")
    assert await again.receive(visibility_timeout=30) == []


def test_queue_names_are_made_valid() -> None:
    assert queue_name("async", "iris") == "async-iris"
    dotted = queue_name("batch", "text.generator", "0190f3a2")
    assert dotted.startswith("batch-text-generator") and "." not in dotted
    assert dotted != queue_name("batch", "text-generator", "0190f3a2")
    assert len(queue_name("x" * 200)) <= 60


async def test_claim_undoes_a_claim_that_lands_after_its_caller_is_gone() -> None:
    """The hand-off under every receive, with real threads: the claim finishes after the
    cancellation, so the claiming thread undoes it."""
    entered, go = threading.Event(), threading.Event()
    undone: list[list[int]] = []

    def fn() -> list[int]:
        entered.set()
        go.wait(10)
        return [1, 2]

    task = asyncio.create_task(claim(asyncio.to_thread, fn, undo=undone.append, spawn=_now))
    await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    go.set()
    await wait_until(lambda: undone, timeout=5, what="the undo")
    assert undone == [[1, 2]]


async def test_claim_undoes_a_claim_its_cancelled_caller_never_read() -> None:
    """The claim finished first, but the task is cancelled before it reads the result: the
    cancelled side undoes it."""
    landed = asyncio.Event()
    undone: list[list[int]] = []

    async def run(f: Callable[[], list[int]]) -> list[int]:
        result = await asyncio.to_thread(f)
        landed.set()
        await asyncio.Event().wait()  # cancelled here, the result in hand
        return result

    task = asyncio.create_task(claim(run, lambda: [3], undo=undone.append, spawn=_now))
    await landed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == [[3]]


def _now(job: Callable[[], None]) -> None:
    job()

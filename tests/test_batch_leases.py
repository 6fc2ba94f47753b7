"""The lease rules of batch jobs, in one process on a real embedded store: two BatchApi objects
(two gateways) on one job record. Once another gateway holds a job, the one that lost it neither
enqueues, nor moves the job's progress, nor ends it, nor supervises it; a lease it cannot renew
for four fifths of the lease stops its work first; a stop hands its jobs on to a running gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from async_helpers import write_config
from batch_helpers import recorder_batch_api

from gateway.batchapi.inputs import ITEM_LIST, Batch, Inputs, Source
from gateway.batchapi.jobs import (
    ENQUEUING,
    FAILED_WHILE_ENQUEUING,
    RUNNING,
    Job,
    Jobs,
    job_queue,
    open_work,
)
from gateway.batchapi.runner import CHUNK, FENCE, BatchApi, Disowned
from gateway.work import Work, WorkError
from modelmux_common import config as config_mod

LEASE = 0.6


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[BatchApi, BatchApi]]:
    api_spec = recorder_batch_api(
        "rec",
        tmp_path / "runs.log",
        batch={"visibility_timeout": f"{LEASE}s", "spawn_workers": False},
    )
    config = config_mod.load(write_config(tmp_path / "modelmux.yaml", [api_spec]))
    [api] = config.apis
    assert api.batch_config is not None
    works: list[Work] = []
    gateways = []
    for _ in range(2):
        work = await open_work(config, api.batch_config)
        works.append(work)
        gateways.append(
            BatchApi(
                api,
                work=work,
                jobs=Jobs(api.name, work.store),
                inputs=Inputs(config),
                worker_command=[],
                env={},
            )
        )
    first, second = gateways
    yield first, second
    for gateway in gateways:
        await gateway.close()
    for work in works:
        await work.close()


async def submitted(gateway: BatchApi, items: int = 10) -> tuple[Job, Source]:
    source = Source(ITEM_LIST, 1, items=list(range(items)))
    job = gateway.new_job(
        job_id=f"job{items}", workers=1, config={}, source=ITEM_LIST, batch_size=1
    )
    await gateway.jobs.put_items(job.job_id, source.items)
    await gateway.jobs.create(job)
    return job, source


async def until(gateway: BatchApi, job: Job, check: Callable[[Job], bool]) -> Job:
    """The job's record once ``check`` holds for it (read every 5 ms, for up to 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        now = await gateway.jobs.get(job.job_id)
        assert now is not None
        if check(now):
            return now
        assert time.monotonic() < deadline, now
        await asyncio.sleep(0.005)


async def taken_by(gateway: BatchApi, job: Job) -> Job:
    """``gateway`` takes the job over, as an adoption does."""
    taken = await gateway.jobs.update(
        job.job_id, lambda old: replace(old, owner=gateway.me, owned_at=1e12)
    )
    assert taken is not None and taken.owner == gateway.me
    return taken


async def test_a_gateway_that_lost_a_job_neither_enqueues_nor_moves_its_progress(
    two: tuple[BatchApi, BatchApi],
) -> None:
    first, second = two
    job, _ = await submitted(first)
    queue = await first.work.queue(job_queue("rec", job.job_id), max_receive_count=3)
    await first._put(job, queue, [Batch(0, [0]), Batch(1, [1])])
    assert (await first.jobs.get(job.job_id)).total_batch_count == 2  # type: ignore[union-attr]
    enqueue = queue.enqueue_many

    async def adopted_meanwhile(bodies: list[str]) -> None:
        # past the owner check, the job is adopted and the adopter queues on to batch 7
        await taken_by(second, job)
        await second.jobs.update(job.job_id, lambda old: replace(old, total_batch_count=7))
        await enqueue(bodies)

    queue.enqueue_many = adopted_meanwhile  # type: ignore[method-assign]
    with pytest.raises(Disowned):
        await first._put(job, queue, [Batch(2, [2])])
    now = await first.jobs.get(job.job_id)
    assert now is not None and (now.owner, now.total_batch_count) == (second.me, 7)


async def test_a_gateway_that_lost_a_job_does_not_end_it(two: tuple[BatchApi, BatchApi]) -> None:
    first, second = two
    job, _ = await submitted(first)
    await taken_by(second, job)
    ended = await first.jobs.end(job.job_id, FAILED_WHILE_ENQUEUING, owner=first.me, error="x")
    assert ended is not None and ended.status == ENQUEUING
    ended = await second.jobs.end(job.job_id, FAILED_WHILE_ENQUEUING, owner=second.me, error="x")
    assert ended is not None and ended.status == FAILED_WHILE_ENQUEUING


async def test_a_supervisor_lets_go_of_a_job_another_gateway_holds(
    two: tuple[BatchApi, BatchApi],
) -> None:
    first, second = two
    job, _ = await submitted(first)
    running = await first.jobs.update(job.job_id, lambda old: replace(old, status=RUNNING))
    assert running is not None
    supervising = asyncio.create_task(first._supervise(running))
    await taken_by(second, job)
    await asyncio.wait_for(supervising, timeout=5)  # returned on its own: not held here any more
    assert (await first.jobs.get(job.job_id)).status == RUNNING  # type: ignore[union-attr]


async def test_the_renewal_sees_an_adoption_and_cancels_the_local_work(
    two: tuple[BatchApi, BatchApi],
) -> None:
    first, second = two
    job, _ = await submitted(first)
    first._start(job.job_id, asyncio.Event().wait())  # stands for its enqueue or supervisor
    task = first.tasks[job.job_id]
    await taken_by(second, job)
    await first._renew_held()
    await asyncio.wait([task], timeout=5)
    assert task.cancelled() and job.job_id not in first.tasks
    assert (await first.jobs.get(job.job_id)).owner == second.me  # type: ignore[union-attr]


async def test_a_lease_it_cannot_renew_stops_the_local_work_before_it_lapses(
    two: tuple[BatchApi, BatchApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = two
    job, _ = await submitted(first)
    first._start(job.job_id, asyncio.Event().wait())
    task = first.tasks[job.job_id]

    async def hangs(*args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()  # a store that does not answer

    monkeypatch.setattr(first.jobs, "update", hangs)
    await asyncio.wait_for(first._renew_held(), timeout=LEASE)  # each renewal bounded
    await first._fence()
    assert not task.done()  # within the fence: it keeps the work
    first.renewed[job.job_id] -= FENCE * LEASE  # the last renewal, four fifths of a lease ago
    await first._fence()
    await asyncio.wait([task], timeout=5)
    assert task.cancelled()


async def test_the_supervisor_rides_out_a_store_error(
    two: tuple[BatchApi, BatchApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = two
    job, _ = await submitted(first)
    running = await first.jobs.update(job.job_id, lambda old: replace(old, status=RUNNING))
    assert running is not None
    get, calls = first.jobs.get, []

    async def away_twice(job_id: str) -> Job | None:
        calls.append(job_id)
        if len(calls) <= 2:
            raise WorkError("the store is away")
        return await get(job_id)

    monkeypatch.setattr(first.jobs, "get", away_twice)
    supervising = asyncio.create_task(first._supervise(running))
    await until(second, job, lambda j: len(calls) > 2)
    assert not supervising.done()
    await second.jobs.end(job.job_id, "STOPPED")
    await asyncio.wait_for(supervising, timeout=5)


async def test_an_adopted_job_keeps_the_count_its_first_owner_queued(
    two: tuple[BatchApi, BatchApi],
) -> None:
    first, second = two
    job, source = await submitted(first, items=30)
    # the first owner queued 50 batches of a listing that has 30 now: all 50 must end
    held = await taken_by(second, job)
    held = await second.jobs.update(job.job_id, lambda old: replace(old, total_batch_count=50))
    assert held is not None
    second.start(held, source)
    ended = await until(second, job, lambda j: j.status == RUNNING)
    assert ended.total_batch_count == 50


async def test_a_stop_hands_the_job_to_a_running_gateway_on_its_next_round(
    two: tuple[BatchApi, BatchApi],
) -> None:
    first, second = two
    job, source = await submitted(first, items=300)
    listed = first.inputs.batches

    def gated(source: Source) -> Iterator[Batch]:
        """The listing, held after its first chunk until the stop has begun."""
        for batch in listed(source):
            if batch.index == CHUNK:
                deadline = time.monotonic() + 10
                while not first.tasks[job.job_id].cancelling() and time.monotonic() < deadline:
                    time.sleep(0.001)
            yield batch

    first.inputs.batches = gated  # type: ignore[method-assign]
    first.start(job, source)
    await until(first, job, lambda j: j.total_batch_count > 0)  # its first chunk queued
    await first.close()
    left = await first.jobs.get(job.job_id)
    assert left is not None and (left.owner, left.owned_at) == ("", 0.0)
    assert left.status == ENQUEUING and left.total_batch_count < 300, left
    await second._adopt_lapsed()
    assert job.job_id in second.tasks
    ended = await until(second, job, lambda j: j.status == RUNNING)
    assert ended.total_batch_count == 300
    # each batch queued once: the first stopped between two chunks, the second went on after it
    queue = await second.work.queue(job_queue("rec", job.job_id), max_receive_count=3)
    seen: list[int] = []
    while messages := await queue.receive(max_messages=10, visibility_timeout=30, wait=0):
        seen.extend(json.loads(m.body)["i"] for m in messages)
    assert sorted(seen) == list(range(300)), (left.total_batch_count, len(seen))


def test_a_record_with_fields_of_a_newer_version_reads_and_keeps_them() -> None:
    job = Job("j", "rec", RUNNING, 1, {}, ITEM_LIST, 1, 0.0)
    newer = json.dumps({**json.loads(job.encode()), "added_later": 1}).encode()
    read = Job.decode(newer)
    assert read == job
    assert json.loads(replace(read, status=ENQUEUING).encode())["added_later"] == 1

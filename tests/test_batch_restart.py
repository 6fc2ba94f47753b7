"""Batch jobs outlive the processes that run them: the gateway that accepted a job is killed with
SIGKILL mid-run and mid-enqueue, and a gateway started after it adopts the job once its lease lapses
and finishes it with every item processed and the hook run once; the worker running the hook is
killed while it runs, and the job ends WORKER_ERROR saying so, the hook not run a second time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from async_helpers import kill, start_gateway, wait_until, write_config
from batch_helpers import Jobs, done_items, notes, recorder_batch_api, status, wait_gone
from conftest import Proc

from gateway.batchapi.jobs import Job, open_work
from gateway.batchapi.jobs import Jobs as JobRecords
from gateway.batchapi.runner import CHUNK
from modelmux_common import config as config_mod

LEASE = "2s"  # batch.visibility_timeout: the lease of a job's gateway and of a batch's worker


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    log = tmp_path / "runs.log"
    api = recorder_batch_api("rec", log, batch={"visibility_timeout": LEASE}, delay=0.05)
    yield write_config(tmp_path / "modelmux.yaml", [api]), log


def record(
    config: Path, job_id: str, until: Callable[[Job], bool] = lambda job: True
) -> Job | None:
    """The job's record as the store holds it, read without a gateway (the first that ``until``
    accepts, read every millisecond for up to 30 s)."""

    async def read() -> Job | None:
        loaded = config_mod.load(config)
        api = next(a for a in loaded.apis if a.name == "rec")
        assert api.batch_config is not None
        work = await open_work(loaded, api.batch_config)
        records = JobRecords("rec", work.store)
        deadline = time.monotonic() + 30
        try:
            while True:
                job = await records.get(job_id)
                if job is None or until(job) or time.monotonic() > deadline:
                    return job
                await asyncio.sleep(0.001)
        finally:
            await work.close()

    return asyncio.run(read())


def finish_elsewhere(config: Path, job_id: str) -> tuple[Proc, dict[str, object]]:
    """A second gateway on the same store; the job as it ended there."""
    successor = start_gateway(config)
    with Jobs(successor.address) as jobs:
        ended = jobs.watch(job_id, timeout=120)[-1]
    return successor, ended


def test_gateway_killed_mid_run(stack: tuple[Path, Path]) -> None:
    config, log = stack
    items = list(range(60))
    first = start_gateway(config)
    with Jobs(first.address) as jobs:
        job = jobs.submit(api="rec", workers=2, itemList={"items": items, "batchSize": 2})["job"]
    wait_until(lambda: len(notes(log, "done")) >= 5, timeout=60, what="five batches done")
    workers = {n["pid"] for n in notes(log, "init")}
    kill(first)
    wait_gone(workers, timeout=15)  # nothing the gateway started outlives it
    assert record(config, job["jobId"]).status == "RUNNING"  # type: ignore[union-attr]
    successor, ended = finish_elsewhere(config, job["jobId"])
    try:
        assert status(ended) == "SUCCEEDED", ended
        assert ended["batchesSucceeded"] == 30
        assert set(done_items(log)) == {json.dumps(i) for i in items}  # every item
        assert len(notes(log, "hook")) == 1
        adopted = [e for e in successor.lines if e.get("event") == "batch_job_adopted"]
        assert [e["status"] for e in adopted] == ["RUNNING"], adopted
    finally:
        successor.stop()


def test_gateway_killed_mid_enqueue(stack: tuple[Path, Path]) -> None:
    config, log = stack
    items = list(range(1000))  # 1000 batches of one, enqueued 100 at a time
    first = start_gateway(config)
    with Jobs(first.address) as jobs:
        job = jobs.submit(
            api="rec", workers=2, config={"delay": 0}, itemList={"items": items, "batchSize": 1}
        )["job"]
    # killed once its first batches are queued, before the rest are
    record(config, job["jobId"], lambda job: job.total_batch_count > 0 or job.status != "ENQUEUING")
    kill(first)
    left = record(config, job["jobId"])
    assert left is not None and left.status == "ENQUEUING", left
    assert 0 < left.total_batch_count < len(items), left
    print(f"killed with {left.total_batch_count} of {len(items)} batches queued")
    successor, ended = finish_elsewhere(config, job["jobId"])
    try:
        assert status(ended) == "SUCCEEDED", ended
        assert ended["totalBatchCount"] == ended["batchesSucceeded"] == len(items)
        done = done_items(log)
        assert set(done) == {json.dumps(i) for i in items}
        assert len(notes(log, "hook")) == 1
        adopted = [e for e in successor.lines if e.get("event") == "batch_job_adopted"]
        assert [e["status"] for e in adopted] == ["ENQUEUING"], adopted
        # the batches the first gateway recorded as queued are not queued again: at most the chunk
        # it was queuing when killed, and the batches its workers were running, ran twice
        twice = sorted(int(item) for item, n in done.items() if n > 1)
        queuing = range(left.total_batch_count, left.total_batch_count + CHUNK)
        assert len([i for i in twice if i not in queuing]) <= 2, (left.total_batch_count, twice)
        # a batch queued twice keeps its batch_id (the handler's idempotency key)
        ids = {(json.dumps(n["items"]), n["batch_id"]) for n in notes(log, "done")}
        assert len(ids) == len({batch_id for _, batch_id in ids}) == len(items)
    finally:
        successor.stop()


def test_stopped_gateway_hands_its_jobs_on_at_once(stack: tuple[Path, Path]) -> None:
    config, log = stack
    first = start_gateway(config)
    with Jobs(first.address) as jobs:
        job = jobs.submit(
            api="rec",
            workers=1,
            config={"delay": 0.5},
            itemList={"items": list(range(6)), "batchSize": 1},
        )["job"]
    wait_until(lambda: notes(log, "start"), timeout=60, what="a batch started")
    assert first.stop() == 0
    left = record(config, job["jobId"])
    assert left is not None and (left.owner, left.owned_at) == ("", 0.0)  # its lease given up
    successor, ended = finish_elsewhere(config, job["jobId"])
    try:
        assert status(ended) == "SUCCEEDED", ended
        assert len(notes(log, "hook")) == 1
    finally:
        successor.stop()


def test_hook_runner_killed_while_the_hook_runs(stack: tuple[Path, Path]) -> None:
    config, log = stack
    gateway = start_gateway(config)
    try:
        with Jobs(gateway.address) as jobs:
            job = jobs.submit(
                api="rec",
                workers=1,
                config={"hook_delay": 60},
                itemList={"items": [1, 2, 3], "batchSize": 1},
            )["job"]
            runner = wait_until(lambda: notes(log, "hook"), timeout=60, what="the hook")[0]
            os.kill(runner["pid"], signal.SIGKILL)
            ended = jobs.watch(job["jobId"])[-1]
        assert status(ended) == "WORKER_ERROR", ended
        assert "died while the hook ran" in ended["error"], ended
        assert ended["batchesSucceeded"] == 3
        assert len(notes(log, "hook")) == 1  # not run a second time
    finally:
        gateway.stop()

"""The Python client's Jobs methods (``Client`` and ``AsyncClient``) against a real gateway
serving a BatchAPI: typed jobs, dry runs, watching, pages, stopping, failed batches with their
items, and each error as its exception."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Proc
from test_jobcli import API, start_recorder_gateway

from modelmux.client import (
    AsyncClient,
    Client,
    DryRun,
    FailedPreconditionError,
    InvalidArgumentError,
    Job,
    NotFoundError,
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = start_recorder_gateway(tmp_path_factory.mktemp("client-jobs"))
    yield proc
    proc.stop()


@pytest.fixture
def client(gateway: Proc) -> Iterator[Client]:
    with Client(gateway.address, timeout=30) as c:
        yield c


def test_submit_watch_get_and_failed_batches(client: Client) -> None:
    items = [{"n": 1}, {"fail": "x"}, {"n": 3}, {"n": 4.5}, "five", [6], None]
    submitted = client.submit_job(
        API,
        workers=2,
        items=items,
        batch_size=2,
        config={"nested": {"b": 3}},
        job_timeout=600,
        max_receive_count=2,
    )
    assert isinstance(submitted, Job) and submitted.status == "ENQUEUING" and not submitted.done
    assert (submitted.workers, submitted.batch_size, submitted.source) == (2, 2, "item_list")
    assert (submitted.timeout, submitted.max_receive_count) == (600.0, 2)
    assert submitted.config == {"nested": {"b": 3}}
    updates = list(client.watch_job(submitted.job_id, timeout=120))
    final = updates[-1]
    assert [u.done for u in updates] == [False] * (len(updates) - 1) + [True]
    assert final.status == "COMPLETED_WITH_FAILURES" and not final.succeeded
    assert (final.total_batch_count, final.batches_succeeded, final.batches_failed) == (4, 3, 1)
    assert final.batches_done == 4 and final.item_count == 7
    assert final.start_time is not None and final.end_time is not None
    assert final.start_time <= final.end_time <= time.time()
    assert client.get_job(submitted.job_id, api=API) == final
    batches, token = client.failed_batches(submitted.job_id)
    assert token == ""
    (failed,) = batches
    assert (failed.index, failed.attempts, failed.dead_lettered) == (0, 2, True)
    assert failed.items == [{"n": 1}, {"fail": "x"}]
    assert failed.error == "ValueError: asked to fail: x"


def test_dry_run_is_typed_and_lists_files(client: Client, tmp_path: Path) -> None:
    for name in ("a.ndjson", "b.ndjson", "c.txt"):
        (tmp_path / name).write_text("1\n2\n3\n")
    dry = client.submit_job(
        API, workers=1, ndjson=[str(tmp_path)], includes=["*.ndjson"], batch_size=2, dry_run=True
    )
    assert isinstance(dry, DryRun)
    assert dry == DryRun(
        files=[str(tmp_path / "a.ndjson"), str(tmp_path / "b.ndjson")],
        file_count=2,
        item_count=6,
        total_batch_count=3,  # batches run across files: lines in listing order
    )
    files = client.submit_job(
        API, workers=1, files=[str(tmp_path)], excludes=["*.txt"], dry_run=True
    )
    assert (files.file_count, files.item_count, files.total_batch_count) == (2, 2, 2)


def test_list_jobs_pages_newest_first_and_filters(client: Client) -> None:
    ids = [client.submit_job(API, workers=1, items=[i]).job_id for i in range(3)]
    for job_id in ids:
        assert list(client.watch_job(job_id, timeout=120))[-1].succeeded
    seen: list[str] = []
    token = ""
    while True:
        page, token = client.list_jobs(API, page_size=1, page_token=token)
        assert len(page) <= 1
        seen.extend(j.job_id for j in page)
        if not token:
            break
    assert [i for i in seen if i in ids] == ids[::-1]
    assert seen == sorted(seen, reverse=True)
    succeeded, _ = client.list_jobs(statuses=["SUCCEEDED"], page_size=1000)
    assert set(ids) <= {j.job_id for j in succeeded}
    assert {j.status for j in succeeded} == {"SUCCEEDED"}
    stopped, _ = client.list_jobs(API, statuses=["STOPPED"], page_size=1000)
    assert not set(ids) & {j.job_id for j in stopped}


def test_stop_job_then_stop_again_is_failed_precondition(client: Client) -> None:
    job = client.submit_job(API, workers=1, items=[{"delay": 2}] * 10)
    stopped = client.stop_job(job.job_id)
    assert stopped.status == "STOPPED" and stopped.done and stopped.end_time is not None
    with pytest.raises(FailedPreconditionError, match="already ended"):
        client.stop_job(job.job_id)


def test_errors_are_typed(client: Client) -> None:
    with pytest.raises(NotFoundError, match="no API named 'nope'"):
        client.submit_job("nope", workers=1, items=[1])
    with pytest.raises(InvalidArgumentError, match="workers 0"):
        client.submit_job(API, workers=0, items=[1])
    with pytest.raises(InvalidArgumentError):
        client.submit_job(API, workers=1, items=[1], batch_size=0)
    with pytest.raises(NotFoundError):
        client.get_job("no-such-job")
    with pytest.raises(NotFoundError):
        list(client.watch_job("no-such-job", timeout=30))
    with pytest.raises(NotFoundError):
        client.failed_batches("no-such-job")
    with pytest.raises(ValueError, match="exactly one of items, files or ndjson"):
        client.submit_job(API, workers=1)
    with pytest.raises(ValueError, match="exactly one"):
        client.submit_job(API, workers=1, items=[1], files=["/tmp"])
    with pytest.raises(ValueError, match="do not apply to items"):
        client.submit_job(API, workers=1, items=[1], includes=["*"])


async def test_async_face(gateway: Proc, tmp_path: Path) -> None:
    (tmp_path / "x.ndjson").write_text('{"n": 1}\n{"n": 2}\n')
    async with AsyncClient(gateway.address, timeout=30) as aclient:
        dry = await aclient.submit_job(API, workers=1, ndjson=[str(tmp_path)], dry_run=True)
        assert dry.item_count == 2
        job = await aclient.submit_job(API, workers=1, ndjson=[str(tmp_path)])
        updates = [u async for u in aclient.watch_job(job.job_id, timeout=120)]
        assert updates[-1].succeeded and updates[-1].total_batch_count == 2
        assert await aclient.get_job(job.job_id) == updates[-1]
        page, _ = await aclient.list_jobs(API, page_size=1)
        assert [j.job_id for j in page] == [job.job_id]
        assert await aclient.failed_batches(job.job_id) == ([], "")
        slow = await aclient.submit_job(API, workers=1, items=[{"delay": 2}] * 5)
        assert (await aclient.stop_job(slow.job_id, api=API)).status == "STOPPED"
        with pytest.raises(NotFoundError):
            await aclient.get_job("no-such-job")

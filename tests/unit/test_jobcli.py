"""The pure pieces of ``modelmux job`` and the client's Jobs requests: the watch's rate and time
left, its texts, the statuses the command line knows, and SubmitJob requests built from
arguments (one source, and what does not apply to it refused before any call)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from modelmux.client import Job
from modelmux.client.jobs import JobStatus, job, submit_job_request
from modelmux.v1 import jobs_pb2
from modelmux_common import jobargs, jobwatch

NO_SOURCE = {"items": None, "files": (), "ndjson": ()}
DEFAULTS = {
    "workers": 2,
    "batch_size": 3,
    "includes": (),
    "excludes": (),
    "config": None,
    "job_timeout": None,
    "max_receive_count": None,
    "dry_run": False,
}


def a_job(**fields: object) -> Job:
    base = job(jobs_pb2.Job(job_id="j1", api="a", status=jobs_pb2.JOB_STATUS_RUNNING))
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def test_the_command_line_knows_every_status_of_the_proto() -> None:
    wire = [n.removeprefix("JOB_STATUS_") for n, _ in jobs_pb2.JobStatus.items()]
    assert [s for s in wire if s != "UNSPECIFIED"] == list(jobargs.STATUSES)
    assert set(JobStatus.__args__) == set(wire)  # type: ignore[attr-defined]


def test_rate_over_a_sliding_window_and_eta() -> None:
    rate = jobwatch.Rate(window=10)
    running = a_job(total_batch_count=100)
    assert rate.per_second(0) is None and rate.eta(running, 0) is None
    rate.add(0, 0.0)
    rate.add(10, 5.0)
    assert rate.per_second(5.0) == 2.0
    assert rate.eta(dataclasses.replace(running, batches_succeeded=10), 5.0) == 45.0
    rate.add(10, 30.0)  # a stall: the window forgets the start, keeping one sample before it
    rate.add(12, 31.0)
    assert rate.samples[0] == (5.0, 10)
    assert rate.per_second(31.0) == pytest.approx(2 / 26)
    assert rate.eta(a_job(status="ENQUEUING"), 1.0) is None  # no total yet
    assert rate.eta(a_job(status="SUCCEEDED"), 1.0) == 0.0


def test_window_keeps_only_recent_samples() -> None:
    rate = jobwatch.Rate(window=10)
    for t in range(0, 100, 5):
        rate.add(t, float(t))
    assert rate.samples[0][0] >= 100 - 5 - 10
    assert rate.per_second(95.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.4, "0s"), (45, "45s"), (185, "3m05s"), (7800, "2h10m")],
)
def test_seconds_text(seconds: float | None, text: str) -> None:
    assert jobwatch.seconds_text(seconds) == text


def test_progress_line_and_summary() -> None:
    running = a_job(
        total_batch_count=40, batches_succeeded=10, batches_failed=2, batches_in_flight=3
    )
    rate = jobwatch.Rate()
    rate.add(0, 0.0)
    rate.add(12, 4.0)
    assert jobwatch.progress_line(running, rate, 4.0) == (
        "job j1 RUNNING: 12/40 batches, 2 failed, 3 running, 3.0/s, ETA 9s"
    )
    ended = dataclasses.replace(
        running,
        status="COMPLETED_WITH_FAILURES",
        batches_succeeded=38,
        batches_in_flight=0,
        start_time=100.0,
        end_time=165.0,
        completion_hook="SUCCEEDED",
    )
    assert jobwatch.summary(ended) == [
        "job j1 COMPLETED_WITH_FAILURES in 1m05s: 38/40 batches succeeded, 2 failed; "
        "completion hook SUCCEEDED",
        "failed batches and their items: modelmux job failed j1",
    ]


def test_submit_request_per_source() -> None:
    items = submit_job_request("a", **{**DEFAULTS, **NO_SOURCE, "items": [1, "x", {"k": [2]}]})
    assert items.WhichOneof("source") == "item_list"
    assert [v.WhichOneof("kind") for v in items.item_list.items] == [
        "number_value",
        "string_value",
        "struct_value",
    ]
    assert items.item_list.batch_size == 3 and not items.HasField("timeout")
    files = submit_job_request(
        "a",
        **{
            **DEFAULTS,
            **NO_SOURCE,
            "files": ["s3://b/p/"],
            "includes": ["*.jpg"],
            "job_timeout": 1.5,
            "max_receive_count": 4,
            "config": {"k": {"n": 1}},
        },
    )
    assert files.WhichOneof("source") == "file_path_lister"
    assert list(files.file_path_lister.includes) == ["*.jpg"]
    assert files.timeout.ToNanoseconds() == 1_500_000_000
    assert files.dead_letter.max_receive_count == 4
    assert files.config["k"]["n"] == 1
    ndjson = submit_job_request("a", **{**DEFAULTS, **NO_SOURCE, "ndjson": ["/d"]})
    assert ndjson.WhichOneof("source") == "delimited_files"


@pytest.mark.parametrize(
    ("sources", "said"),
    [
        ({}, "exactly one of items, files or ndjson (given: none)"),
        ({"items": [1], "ndjson": ["/d"]}, "given: ['items', 'ndjson']"),
    ],
)
def test_submit_request_needs_exactly_one_source(sources: dict[str, object], said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        submit_job_request("a", **{**DEFAULTS, **NO_SOURCE, **sources})  # type: ignore[arg-type]

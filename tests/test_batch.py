"""Batch APIs end to end on the embedded store (and S3 inputs on moto's server): a real gateway
process, real per-job worker processes, the seeds' TensorFlow batch handler on a real embedded
backend, kill -9 of a worker mid-job, timeouts, StopJob and every bad input."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from async_helpers import start_gateway, wait_until, write_config
from batch_helpers import (
    FLOWER,
    SEED,
    Jobs,
    done_items,
    notes,
    recorder_batch_api,
    status,
    wait_gone,
)
from conftest import Proc
from google.protobuf import json_format
from modelsync_helpers import MotoServer, moto_for_module, new_bucket

from modelmux.client import Client
from modelmux.v1 import jobs_pb2

BATCH = {"visibility_timeout": "2s"}


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_for_module(tmp_path_factory)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc, moto: MotoServer
) -> Iterator[tuple[Proc, Path]]:
    root = tmp_path_factory.mktemp("batch")
    log = root / "runs.log"
    seed = {
        "name": "seed",
        "kind": "BatchAPI",
        "handler": {
            "type": "tensorflow",
            "path": SEED,
            "models": {"path": str(example_models / "iris")},
            "config": {
                "labels": ["setosa", "versicolor", "virginica"],
                "results": str(root / "results"),
                "s3_endpoint": moto.endpoint,
            },
        },
        "batch": BATCH,
    }
    apis = [
        seed,
        recorder_batch_api("rec", log, batch=BATCH, nested={"a": 1, "b": {"c": 2, "d": 3}}),
        {
            "name": "plain",
            "handler": {
                "type": "tensorflow",
                "models": {"path": str(example_models / "half_plus_two")},
            },
        },
    ]
    config = write_config(
        root / "modelmux.yaml", apis, backend=backend.address, metrics_listen="127.0.0.1:0"
    )
    text = config.read_text().replace(
        "gateway:",
        f"modelsync:\n  s3_endpoint_url: {moto.endpoint}\n  s3_region: us-east-1\ngateway:",
        1,
    )
    config.write_text(text)
    proc = start_gateway(config)
    with Client(proc.address) as client:  # the seed API's model is loaded on the backend
        wait_until(lambda: client.health() == "SERVING", timeout=60, what="SERVING")
    yield proc, root
    proc.stop()


@pytest.fixture(scope="module")
def jobs(stack: tuple[Proc, Path]) -> Iterator[Jobs]:
    client = Jobs(stack[0].address)
    yield client
    client.close()


@pytest.fixture
def log(stack: tuple[Proc, Path]) -> Path:
    path = stack[1] / "runs.log"
    path.write_text("")
    return path


def _write_inputs(root: Path, moto: MotoServer, where: str, *, ndjson: bool) -> list[str]:
    """Seven flowers as files (or two NDJSON files); the paths to list."""
    names = [f"in/part-{i}.json" for i in range(7)] + ["in/skip.txt"]
    bodies = [json.dumps(FLOWER) for _ in range(7)] + ["not an input"]
    if ndjson:
        names = ["in/a.ndjson", "in/b.ndjson", "in/skip.txt"]
        bodies = [
            "\n".join([json.dumps(FLOWER)] * 4) + "\n",
            "\n" + json.dumps(FLOWER) * 1 + "\n\n" + json.dumps(FLOWER) + "\n" + json.dumps(FLOWER),
            "x",
        ]
    if where == "local":
        folder = root / f"inputs-{os.urandom(4).hex()}"
        for name, body in zip(names, bodies, strict=True):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(body)
        return [str(folder / "in")]
    bucket = new_bucket(moto)
    for name, body in zip(names, bodies, strict=True):
        moto.client().put_object(Bucket=bucket, Key=name, Body=body.encode())
    return [f"s3://{bucket}/in/"]


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("item_list", ""),
        ("file_path_lister", "local"),
        ("file_path_lister", "s3"),
        ("delimited_files", "local"),
        ("delimited_files", "s3"),
    ],
)
def test_seed_handler_over_every_source(
    jobs: Jobs, stack: tuple[Proc, Path], moto: MotoServer, source: str, where: str
) -> None:
    root = stack[1]
    if source == "item_list":
        spec: dict[str, Any] = {"items": [FLOWER] * 7, "batchSize": 3}
    else:
        paths = _write_inputs(root, moto, where, ndjson=source == "delimited_files")
        spec = {"paths": paths, "excludes": ["*.txt"], "batchSize": 3}
    dry = jobs.submit(api="seed", workers=2, dryRun=True, **{source: spec})["dryRun"]
    assert (dry.get("itemCount"), dry["totalBatchCount"]) == (7, 3)
    if source == "file_path_lister":
        assert dry["fileCount"] == 7 and all(f.endswith(".json") for f in dry["files"])
    job = jobs.run(api="seed", workers=2, **{source: spec})
    assert status(job) == "SUCCEEDED", job
    assert job["totalBatchCount"] == 3 and job["batchesSucceeded"] == 3 and job["itemCount"] == 7
    assert job["completionHook"] == "COMPLETION_HOOK_STATE_SUCCEEDED"
    results = root / "results" / job["jobId"]
    summary = json.loads((results / "summary.json").read_text())
    assert summary == {"items": 7, "labels": {"setosa": 7}}
    assert len((results / "hook.log").read_text().split()) == 1  # the hook ran once
    assert len(list(results.glob("*.ndjson"))) == 3


def test_on_job_complete_config_merge_and_metrics(
    jobs: Jobs, log: Path, stack: tuple[Proc, Path]
) -> None:
    job = jobs.run(
        api="rec",
        workers=2,
        config={"nested": {"b": {"c": 20}}, "extra": "x"},
        itemList={"items": list(range(10)), "batchSize": 2},
    )
    assert status(job) == "SUCCEEDED"
    inits = notes(log, "init")
    assert len(inits) == 2  # each worker built the handler once
    for init in inits:
        assert init["config"]["nested"] == {"a": 1, "b": {"c": 20, "d": 3}}
        assert init["config"]["extra"] == "x"
        spec = init["job_spec"]
        assert spec["job_id"] == job["jobId"] and spec["api_name"] == "rec"
        assert spec["config"] == {"nested": {"b": {"c": 20}}, "extra": "x"}
        assert (spec["workers"], spec["total_batch_count"]) == (2, 5)
        assert spec["start_time"].endswith("Z")
    assert sorted(done_items(log)) == sorted(json.dumps(i) for i in range(10))
    assert len(notes(log, "hook")) == 1
    port = next(int(e["port"]) for e in stack[0].lines if e.get("event") == "metrics")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    line = f'modelmux_batch_batches_total{{api="rec",job="{job["jobId"]}",outcome="succeeded"}} 5.0'
    assert line in text
    assert f'modelmux_batch_batch_seconds_count{{api="rec",job="{job["jobId"]}"}} 5.0' in text


@pytest.mark.parametrize("dead_letter", [None, 3])
def test_failing_items(jobs: Jobs, log: Path, dead_letter: int | None) -> None:
    items: list[Any] = list(range(12))
    items[4] = {"fail": "four"}
    items[10] = {"fail": "ten"}
    extra = {"deadLetter": {"maxReceiveCount": dead_letter}} if dead_letter else {}
    job = jobs.run(api="rec", workers=2, itemList={"items": items, "batchSize": 3}, **extra)
    assert status(job) == "COMPLETED_WITH_FAILURES", job
    assert (job["batchesSucceeded"], job["batchesFailed"]) == (2, 2)
    failed = jobs.failed(job["jobId"], page_size=1)
    assert [f["index"] for f in failed] == [1, 3]
    assert failed[0]["items"] == [3, {"fail": "four"}, 5]
    assert failed[1]["items"] == [9, {"fail": "ten"}, 11]
    assert failed[0]["error"] == "ValueError: asked to fail: four"
    runs = dead_letter or 1
    for f in failed:
        assert f["attempts"] == runs
        assert f.get("deadLettered", False) is bool(dead_letter)
        starts = [n for n in notes(log, "start") if n["batch_id"] == f["batchId"]]
        assert len(starts) == runs
    assert len(notes(log, "hook")) == 1


def test_kill_worker_mid_job_loses_nothing(jobs: Jobs, log: Path) -> None:
    items = list(range(40))
    job = jobs.submit(
        api="rec", workers=2, config={"delay": 0.3}, itemList={"items": items, "batchSize": 2}
    )["job"]

    def running() -> list[dict[str, Any]]:
        done = {n["batch_id"] for n in notes(log, "done")}
        return [n for n in notes(log, "start") if n["batch_id"] not in done]

    victim = wait_until(running, timeout=60, what="a batch running")[0]
    os.kill(victim["pid"], signal.SIGKILL)
    ended = jobs.watch(job["jobId"])[-1]
    assert status(ended) == "SUCCEEDED", ended
    assert ended["batchesSucceeded"] == 20
    done = done_items(log)
    assert sorted(done) == sorted(json.dumps(i) for i in items)  # every item, none lost
    assert len(notes(log, "hook")) == 1
    assert len(notes(log, "init")) == 3  # the killed worker was replaced
    killed = [n for n in notes(log, "start") if n["batch_id"] == victim["batch_id"]]
    assert len(killed) == 2  # its batch ran again


def test_timeout_and_stop(jobs: Jobs, log: Path) -> None:
    timed = jobs.run(
        api="rec",
        workers=1,
        timeout="1.5s",
        config={"delay": 0.5},
        itemList={"items": list(range(20)), "batchSize": 1},
    )
    assert status(timed) == "TIMED_OUT" and "timeout" in timed["error"]
    assert timed["completionHook"] == "COMPLETION_HOOK_STATE_SKIPPED"
    wait_gone({n["pid"] for n in notes(log, "init")}, timeout=10)

    job = jobs.submit(
        api="rec",
        workers=2,
        config={"delay": 0.5},
        itemList={"items": list(range(20)), "batchSize": 1},
    )["job"]
    wait_until(lambda: notes(log, "done"), timeout=60, what="a batch done")
    stopped = jobs.stop(job["jobId"])
    assert status(stopped) == "STOPPED"
    with pytest.raises(grpc.RpcError) as info:
        jobs.stop(job["jobId"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_gone({n["pid"] for n in notes(log, "init")}, timeout=10)
    assert status(jobs.get(job["jobId"])) == "STOPPED"
    assert not notes(log, "hook")


def test_worker_errors(jobs: Jobs, log: Path) -> None:
    job = jobs.run(
        api="rec", workers=1, config={"fail_init": True}, itemList={"items": [1], "batchSize": 1}
    )
    assert status(job) == "WORKER_ERROR" and "asked to fail in __init__" in job["error"]
    job = jobs.run(
        api="rec", workers=1, config={"fail_hook": True}, itemList={"items": [1], "batchSize": 1}
    )
    assert status(job) == "WORKER_ERROR"
    assert job["completionHook"] == "COMPLETION_HOOK_STATE_FAILED"
    assert job["hookError"] == "RuntimeError: the hook was asked to fail"
    assert job["batchesSucceeded"] == 1


def test_ndjson_line_that_is_not_json(jobs: Jobs, log: Path, tmp_path: Path) -> None:
    (tmp_path / "a.ndjson").write_text('1\n2\n{"broken": \n4\n5\n6\n')
    job = jobs.run(api="rec", workers=1, delimitedFiles={"paths": [str(tmp_path)], "batchSize": 2})
    assert status(job) == "COMPLETED_WITH_FAILURES", job
    [failed] = jobs.failed(job["jobId"])
    assert failed["index"] == 1 and failed.get("attempts", 0) == 0
    assert failed["error"].startswith(f"{tmp_path / 'a.ndjson'}: line 3 is not JSON")
    assert failed["items"] == ['{"broken": ', "4"]  # the batch's lines as they are
    assert sorted(done_items(log)) == sorted(json.dumps(i) for i in (1, 2, 5, 6))


def test_get_list_and_unknown_jobs(jobs: Jobs, log: Path) -> None:
    job = jobs.run(api="rec", workers=1, itemList={"items": [1, 2], "batchSize": 1})
    assert jobs.get(job["jobId"], api="rec")["jobId"] == job["jobId"]
    listed = jobs.list(api="rec", statuses=["JOB_STATUS_SUCCEEDED"], pageSize=1000)
    assert listed["jobs"][0]["jobId"] == job["jobId"]  # newest first
    assert all(status(j) == "SUCCEEDED" for j in listed["jobs"])
    ids = [j["jobId"] for j in listed["jobs"]]
    assert ids == sorted(ids, reverse=True)
    for call in (lambda: jobs.get("nope"), lambda: jobs.failed("nope")):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _bad_cases(tmp: Path, moto: MotoServer) -> list[tuple[dict[str, Any], grpc.StatusCode, str]]:
    items = {"itemList": {"items": [1], "batchSize": 1}}
    bucket = new_bucket(moto)
    return [
        ({"api": "rec", "workers": 1}, grpc.StatusCode.INVALID_ARGUMENT, "no input source"),
        ({"api": "rec", "workers": 0, **items}, grpc.StatusCode.INVALID_ARGUMENT, "workers 0"),
        (
            {"api": "rec", "workers": 1, "itemList": {"items": [1]}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "batch_size 0",
        ),
        (
            {"api": "rec", "workers": 1, "itemList": {"batchSize": 1}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "items is empty",
        ),
        (
            {"api": "rec", "workers": 1, "deadLetter": {}, **items},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_receive_count 0",
        ),
        (
            {"api": "rec", "workers": 1, "timeout": "0s", **items},
            grpc.StatusCode.INVALID_ARGUMENT,
            "timeout",
        ),
        (
            {
                "api": "rec",
                "workers": 1,
                "filePathLister": {"paths": [str(tmp / "none")], "batchSize": 1},
            },
            grpc.StatusCode.NOT_FOUND,
            "does not exist",
        ),
        (
            {"api": "rec", "workers": 1, "filePathLister": {"paths": ["rel/dir"], "batchSize": 1}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "absolute",
        ),
        (
            {
                "api": "rec",
                "workers": 1,
                "delimitedFiles": {"paths": ["s3://no-such-bucket-x/p"], "batchSize": 1},
            },
            grpc.StatusCode.NOT_FOUND,
            "bucket 'no-such-bucket-x' does not exist",
        ),
        (
            {
                "api": "rec",
                "workers": 1,
                "delimitedFiles": {"paths": [f"s3://{bucket}/empty/"], "batchSize": 1},
            },
            grpc.StatusCode.NOT_FOUND,
            "nothing under",
        ),
        ({"api": "nope", "workers": 1, **items}, grpc.StatusCode.NOT_FOUND, "no API named 'nope'"),
        (
            {"api": "plain", "workers": 1, **items},
            grpc.StatusCode.FAILED_PRECONDITION,
            "RealtimeAPI",
        ),
    ]


def test_bad_inputs(jobs: Jobs, tmp_path: Path, moto: MotoServer) -> None:
    for request, code, text in _bad_cases(tmp_path, moto):
        with pytest.raises(grpc.RpcError) as info:
            jobs.submit(**request)
        assert info.value.code() == code, request
        assert text in (info.value.details() or ""), (request, info.value.details())
    # two input sources cannot be written: the oneof refuses the second (grpcurl says the same)
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(
            {"itemList": {"items": [1]}, "filePathLister": {"paths": ["/x"]}},
            jobs_pb2.SubmitJobRequest(),
        )
    # paths that list nothing once filtered: the job fails while enqueuing, saying so
    (tmp_path / "only.txt").write_text("x")
    job = jobs.run(
        api="rec",
        workers=1,
        filePathLister={"paths": [str(tmp_path)], "excludes": ["*.txt"], "batchSize": 1},
    )
    assert status(job) == "FAILED_WHILE_ENQUEUING" and "no file" in job["error"]

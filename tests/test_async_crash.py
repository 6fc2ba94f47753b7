"""Async requests survive kill -9: of a handler worker, and of the whole gateway, while requests
are in progress and queued; on the embedded store and on SQS + S3 (moto's server over HTTP).
And two gateway processes share one SQS queue, each request running once."""

from __future__ import annotations

import os
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from async_helpers import (
    all_ended,
    counts,
    kill,
    recorder_api,
    runs,
    start_gateway,
    wait_until,
    write_config,
)
from modelsync_helpers import MotoServer, moto_for_module, new_bucket

from modelmux.client import Client


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_for_module(tmp_path_factory)


def aws_store(moto: MotoServer) -> dict[str, Any]:
    return {
        "store": "aws",
        "bucket": new_bucket(moto),
        "prefix": "async",
        "queue_prefix": f"t{uuid.uuid4().hex[:8]}-",
        "endpoint_url": moto.endpoint,
        "region": "us-east-1",
    }


@pytest.fixture(params=["embedded", "aws"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "embedded":
        return {}
    return aws_store(request.getfixturevalue("moto"))


def test_kill_worker_then_gateway_loses_nothing(store: dict[str, Any], tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    api = recorder_api(
        "crash", log, store=store, processes=2, visibility_timeout="2s", max_attempts=5
    )
    config = write_config(tmp_path / "modelmux.yaml", [api])
    gateway = start_gateway(config)
    try:
        with Client(gateway.address, timeout=30) as client:
            ids = [client.submit("crash", {"delay": 0.6}) for _ in range(16)]

            # a handler worker killed in the middle of a request
            def running() -> list[tuple[str, str, int, int]]:
                done = counts(log, "done")
                return [r for r in runs(log) if r[0] == "start" and r[1] not in done]

            _, victim, _, worker_pid = wait_until(running, timeout=60, what="a request running")[0]
            os.kill(worker_pid, signal.SIGKILL)
            # (it slept 0.6 s; the check above is 50 ms old at most)
            assert victim not in counts(log, "done")

            def busy() -> bool:
                done = counts(log, "done")
                return len(done) >= 5 and bool(set(counts(log, "start")) - set(done))

            # then the whole gateway, with requests in progress and queued
            wait_until(busy, timeout=90, what="5 done and one in progress")
            # what the store holds as COMPLETED now must never run again
            recorded = {rid for rid in ids if client.get(rid).state == "COMPLETED"}
            done_before = counts(log, "done")
            kill(gateway)
            # nothing starts once the gateway is gone; what started and had not ended was running
            started = set(counts(log, "start"))
            in_progress = started - set(done_before)
            assert in_progress and len(done_before) < len(ids)
        gateway = start_gateway(config)
        with Client(gateway.address, timeout=30) as client:
            ended = all_ended(client, ids, timeout=180)
            for rid in ids:
                request = ended[rid]
                assert request.state == "COMPLETED", request
                assert request.result == {"id": rid, "payload": {"delay": 0.6}, "type": "dict"}
                assert client.get(rid) == request  # one outcome: every Get says the same
        done = counts(log, "done")
        assert set(done) == set(ids)
        assert counts(log, "start")[victim] >= 2  # the killed run ran again
        twice = {rid for rid, n in counts(log, "start").items() if n > 1}
        # only requests whose run was killed ran again: running, or ended in the handler but not
        # yet recorded when the gateway died (at least once: docs/async.md)
        assert twice <= (started - recorded) | {victim}
    finally:
        gateway.stop()


def test_two_gateways_share_one_queue(moto: MotoServer, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    api = recorder_api(
        "shared", log, store=aws_store(moto), processes=2, threads=2, visibility_timeout="20s"
    )
    config = write_config(tmp_path / "modelmux.yaml", [api], log_requests=False)
    first, second = start_gateway(config), start_gateway(config)
    try:
        with Client(first.address, timeout=60) as client:
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda _: client.submit("shared", {"delay": 0.02}), range(200)))
            ended = all_ended(client, ids, timeout=240)
        assert {r.state for r in ended.values()} == {"COMPLETED"}
        by_gateway = Counter(gateway for what, _, gateway, _ in runs(log) if what == "done")
        assert set(by_gateway) == {first.pid, second.pid}, by_gateway
        assert min(by_gateway.values()) > 0
        starts = counts(log, "start")
        assert len(starts) == 200 and set(starts.values()) == {1}  # none ran twice
    finally:
        first.stop()
        second.stop()

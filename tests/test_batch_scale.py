"""A batch job on SQS + S3 (moto's server over HTTP) drained by two `modelmux worker` processes
started separately, as on two machines; one is killed with SIGKILL mid-batch and the job still
completes with every batch processed and the completion hook run once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from async_helpers import start_gateway, wait_until, write_config
from batch_helpers import Jobs, done_items, notes, recorder_batch_api, status
from conftest import MODELMUX
from modelsync_helpers import AWS_ENV, MotoServer, moto_for_module, new_bucket


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    yield from moto_for_module(tmp_path_factory)


def aws_batch(moto: MotoServer) -> dict[str, Any]:
    return {
        "store": "aws",
        "bucket": new_bucket(moto),
        "queue_prefix": f"t{uuid.uuid4().hex[:8]}-",
        "endpoint_url": moto.endpoint,
        "region": "us-east-1",
        "visibility_timeout": "2s",
        "spawn_workers": False,
    }


def start_worker(config: Path, api: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*MODELMUX, "worker", "--config", str(config), "--api", api],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **AWS_ENV},
    )


def test_two_worker_processes_on_sqs_one_killed(moto: MotoServer, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    api = recorder_batch_api("scale", log, batch=aws_batch(moto), delay=0.3)
    config = write_config(tmp_path / "modelmux.yaml", [api])
    gateway = start_gateway(config)
    workers = [start_worker(config, "scale") for _ in range(2)]
    jobs = Jobs(gateway.address)
    try:
        items = list(range(60))
        job = jobs.submit(api="scale", workers=2, itemList={"items": items, "batchSize": 2})["job"]

        def both_running() -> bool:
            return len({n["pid"] for n in notes(log, "start")}) == 2

        wait_until(both_running, timeout=90, what="both workers running batches")
        victim = workers[0].pid

        def mid_batch() -> bool:
            done = {n["batch_id"] for n in notes(log, "done") if n["pid"] == victim}
            starts = [n for n in notes(log, "start") if n["pid"] == victim]
            return bool(starts) and starts[-1]["batch_id"] not in done

        wait_until(mid_batch, timeout=60, what="the victim in the middle of a batch")
        os.kill(victim, signal.SIGKILL)
        workers[0].wait(10)
        ended = jobs.watch(job["jobId"], timeout=180)[-1]
        assert status(ended) == "SUCCEEDED", ended
        assert ended["batchesSucceeded"] == 30 and ended["totalBatchCount"] == 30
        assert sorted(done_items(log)) == sorted(json.dumps(i) for i in items)
        assert len(notes(log, "hook")) == 1
        assert {n["pid"] for n in notes(log, "hook")} == {workers[1].pid}
    finally:
        jobs.close()
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(15)
        gateway.stop()

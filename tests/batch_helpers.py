"""Shared pieces of the Batch API tests: API specs, a Jobs stub, the recorder's log."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from async_helpers import HANDLERS, wait_until
from google.protobuf import json_format

from modelmux.v1 import jobs_pb2, jobs_pb2_grpc

SEED = str(HANDLERS / "batch_seed.py")
BATCH_RECORDER = str(HANDLERS / "batch_recorder.py")
FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
ENDED = {
    "SUCCEEDED",
    "FAILED_WHILE_ENQUEUING",
    "COMPLETED_WITH_FAILURES",
    "WORKER_ERROR",
    "TIMED_OUT",
    "STOPPED",
}


def recorder_batch_api(
    name: str, log: Path, *, batch: dict[str, Any], **config: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "BatchAPI",
        "handler": {
            "type": "python",
            "path": BATCH_RECORDER,
            "config": {"log": str(log), **config},
        },
        "batch": batch,
    }


class Jobs:
    """modelmux.v1.Jobs over a channel, JSON in and out (what grpcurl users write)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = jobs_pb2_grpc.JobsStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, **request: Any) -> dict[str, Any]:
        message = json_format.ParseDict(request, jobs_pb2.SubmitJobRequest())
        reply = self.stub.SubmitJob(message, timeout=60)
        return json_format.MessageToDict(reply)

    def get(self, job_id: str, api: str = "") -> dict[str, Any]:
        reply = self.stub.GetJob(jobs_pb2.GetJobRequest(api=api, job_id=job_id), timeout=30)
        return json_format.MessageToDict(reply.job)

    def watch(self, job_id: str, *, timeout: float = 120) -> list[dict[str, Any]]:
        stream = self.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=timeout)
        return [json_format.MessageToDict(update.job) for update in stream]

    def stop(self, job_id: str) -> dict[str, Any]:
        reply = self.stub.StopJob(jobs_pb2.StopJobRequest(job_id=job_id), timeout=30)
        return json_format.MessageToDict(reply.job)

    def failed(self, job_id: str, page_size: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        token = ""
        while True:
            request = jobs_pb2.ListFailedBatchesRequest(
                job_id=job_id, page_size=page_size, page_token=token
            )
            reply = self.stub.ListFailedBatches(request, timeout=30)
            out.extend(json_format.MessageToDict(b) for b in reply.batches)
            token = reply.next_page_token
            if not token:
                return out

    def list(self, **request: Any) -> dict[str, Any]:
        message = json_format.ParseDict(request, jobs_pb2.ListJobsRequest())
        return json_format.MessageToDict(self.stub.ListJobs(message, timeout=30))

    def run(self, **request: Any) -> dict[str, Any]:
        """Submits a job and returns it as it ended (WatchJob's last message)."""
        job = self.submit(**request)["job"]
        return self.watch(job["jobId"])[-1]


def status(job: dict[str, Any]) -> str:
    return str(job["status"]).removeprefix("JOB_STATUS_")


def notes(log: Path, what: str | None = None) -> list[dict[str, Any]]:
    """The recorder's lines (all, or those of one kind)."""
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [n for n in lines if what is None or n["what"] == what]


def done_items(log: Path) -> Counter[Any]:
    return Counter(json.dumps(i) for n in notes(log, "done") for i in n["items"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited
        return fh.read().split()[2] != "Z"


def wait_gone(pids: set[int], *, timeout: float) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), timeout=timeout, what=f"{pids} to exit")

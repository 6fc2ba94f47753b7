#!/usr/bin/env python3
"""``make bench``'s async scenario: what Submit costs and how soon its result is there, next to a
realtime Invoke of the same trivial handler (scripts/bench_async_handler.py), in one run.

One gateway process serves three APIs with that handler: ``echo`` (RealtimeAPI, Invoke),
``echo-async`` (AsyncAPI, embedded store in a temporary folder) and ``echo-aws`` (AsyncAPI, SQS +
S3 on moto's server over loopback: moto's own Python is in the figures, AWS's network is not).
At idle, one request at a time (ms, p50 / p99):

  invoke            a realtime Invoke
  submit            an Async.Submit until its reply (payload, queue message, status durable)
  submit->start     from sending the Submit until handle_async starts (the handler's clock)
  submit->result    from sending the Submit until a Watch opened after it ends COMPLETED
and submit throughput: ``--burst`` submits from 8 threads at once (requests per second).

    .venv/bin/python scripts/bench_async.py [--count 200] [--burst 400] [--skip-moto]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import grpc
import yaml
from bench_stack import MODELMUX, ROOT, Child, health_serving
from bench_work import AWS_ENV, moto_server

from modelmux.client.calls import submit_request
from modelmux.v1 import async_pb2, async_pb2_grpc, inference_pb2, inference_pb2_grpc

HANDLER = Path(__file__).resolve().parent / "bench_async_handler.py"


def api(name: str, kind: str, store: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "handler": {"type": "python", "path": str(HANDLER)},
    }
    if store is not None:
        spec["async"] = store
    return spec


def rank(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))] * 1000


def timed(count: int, call: Callable[[], Any]) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


class Measure:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.asyncs = async_pb2_grpc.AsyncStub(self.channel)

    def invoke(self) -> None:
        request = inference_pb2.InvokeRequest(api="echo")
        request.json.number_value = 1
        self.inference.Invoke(request, timeout=10)

    def submit(self, api: str) -> str:
        request = submit_request(api, {"x": 1}, content_type="", request_id=None)
        return self.asyncs.Submit(request, timeout=30).id

    def round_trip(self, api: str) -> tuple[float, float, float]:
        """Seconds of the Submit call, until the handler started, until the Watch ended."""
        sent, wall = time.perf_counter(), time.time()
        rid = self.submit(api)
        replied = time.perf_counter()
        last = None
        for update in self.asyncs.Watch(async_pb2.WatchRequest(api=api, id=rid), timeout=30):
            last = update.request
        done = time.perf_counter()
        assert last is not None and last.state == async_pb2.ASYNC_STATE_COMPLETED, last
        started = last.json.struct_value.fields["started"].number_value
        return replied - sent, started - wall, done - sent

    def burst(self, api: str, count: int) -> float:
        with ThreadPoolExecutor(8) as pool:
            start = time.perf_counter()
            list(pool.map(lambda _: self.submit(api), range(count)))
            return count / (time.perf_counter() - start)


def run(args: argparse.Namespace, workdir: Path, endpoint: str) -> dict[str, Any]:
    apis = [api("echo", "RealtimeAPI"), api("echo-async", "AsyncAPI", {})]
    if endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        store = {"store": "aws", "bucket": bucket, "endpoint_url": endpoint, "region": "us-east-1"}
        apis.append(api("echo-aws", "AsyncAPI", {**store, "queue_prefix": bucket[-8:] + "-"}))
    config = workdir / "modelmux.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "log_requests": False,
                    "state_dir": str(workdir / "state"),
                },
                "apis": apis,
            }
        )
    )
    gateway = Child(
        "gateway", [*MODELMUX, "gateway", "--config", str(config)], logdir=workdir, env=AWS_ENV
    )
    try:
        health_serving(gateway.wait_serving(60), timeout=60)
        measure = Measure(gateway.address)
        for _ in range(args.warmup):
            measure.invoke()
            measure.round_trip("echo-async")
        figures: dict[str, list[float]] = {"invoke": timed(args.count, measure.invoke)}
        results: dict[str, Any] = {}
        for name in ("echo-async", "echo-aws") if endpoint else ("echo-async",):
            store = "embedded" if name == "echo-async" else "moto"
            trips = [measure.round_trip(name) for _ in range(args.count)]
            figures[f"{store} submit"] = [t[0] for t in trips]
            figures[f"{store} submit->start"] = [t[1] for t in trips]
            figures[f"{store} submit->result"] = [t[2] for t in trips]
            results[f"{store} submits/s"] = round(measure.burst(name, args.burst), 1)
        measure.channel.close()
    finally:
        gateway.stop()
    for name, samples in figures.items():
        results[name] = {"p50": round(rank(samples, 0.5), 3), "p99": round(rank(samples, 0.99), 3)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="requests per figure")
    parser.add_argument("--burst", type=int, default=400, help="submits of the throughput figure")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--skip-moto", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args(argv)
    os.environ.update(AWS_ENV)
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp, contextlib.ExitStack() as stack:
        endpoint = "" if args.skip_moto else stack.enter_context(moto_server())
        results = run(args, Path(tmp), endpoint)
    print(f"async scenario, {args.count} requests per figure, ms:")
    for name, value in results.items():
        if isinstance(value, dict):
            print(f"  {name:26s} p50 {value['p50']:8.3f}  p99 {value['p99']:8.3f}")
        else:
            print(f"  {name:26s} {value}")
    invoke, submit = results["invoke"]["p50"], results["embedded submit"]["p50"]
    print(f"  embedded Submit p50 / Invoke p50 = {submit / invoke:.2f} (target <= 2)")
    args.out.mkdir(exist_ok=True)
    out = args.out / f"bench-async-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"count": args.count, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""``make bench``'s batch scenario: what the job machinery costs a trivial handler
(scripts/bench_batch_handler.py), on the embedded store, in one gateway process.

  loop          the handler's handle_batch called over the same batches in a plain loop, in this
                process (no queue, no store, no worker process): the ceiling
  job, N workers  a job of --items items in batches of --batch-size through SubmitJob, with N
                worker processes: items/s from SubmitJob until WatchJob ends (start-up included),
                and while batches run (first batch start to last batch end, the handler's clock)
  per-batch overhead  in the 1-worker job, the gap between one batch's end and the next one's
                start in that worker (receive, outcome record, delete, counting): p50 / p99, ms

With ``--handler-ms`` each handle_batch also sleeps that long (work done elsewhere, e.g. a model
behind a network), which shows how far workers scale when the handler, not the machinery, is
what takes time.

    .venv/bin/python scripts/bench_batch.py [--items 2000] [--batch-size 1] [--workers 1,2]
        [--handler-ms 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from bench_async import rank
from bench_stack import MODELMUX, ROOT, Child, health_serving

from modelmux.client import Client

HANDLER = Path(__file__).resolve().parent / "bench_batch_handler.py"
API = "trivial-batch"
TARGET_OVERHEAD_MS = 5.0


def loop(items: list[int], batch_size: int, config: dict[str, Any]) -> float:
    """Items per second of handle_batch called in a plain loop."""
    spec = importlib.util.spec_from_file_location("bench_batch_handler", HANDLER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = module.Handler(config=config, job_spec={})
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    start = time.perf_counter()
    for n, batch in enumerate(batches):
        handler.handle_batch(batch, f"batch-{n}")
    return len(items) / (time.perf_counter() - start)


def runs(log: Path) -> dict[int, list[tuple[float, float]]]:
    """The handler's (start, end) per batch, per worker process, in order."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for line in log.read_text().splitlines():
        pid, start, end = line.split()
        by_pid.setdefault(int(pid), []).append((float(start), float(end)))
    return by_pid


def job(
    client: Client, items: list[int], *, workers: int, batch_size: int, log: Path, sleep: float
) -> dict[str, Any]:
    sent, sent_at = time.perf_counter(), time.time()
    submitted = client.submit_job(
        API,
        workers=workers,
        items=items,
        batch_size=batch_size,
        config={"log": str(log), "sleep": sleep},
    )
    final = list(client.watch_job(submitted.job_id, timeout=600))[-1]
    wall, ended_at = time.perf_counter() - sent, time.time()
    assert final.succeeded and final.batches_succeeded == final.total_batch_count, final
    by_pid = runs(log)
    calls = sorted(call for calls in by_pid.values() for call in calls)
    assert len(calls) == final.total_batch_count, (len(calls), final.total_batch_count)
    running = calls[-1][1] - calls[0][0]
    gaps = [b[0] - a[1] for calls in by_pid.values() for a, b in itertools.pairwise(calls)]
    return {
        "workers": workers,
        "batches": final.total_batch_count,
        "items/s end to end": round(len(items) / wall, 1),
        "items/s while running": round(len(items) / running, 1),
        "seconds end to end": round(wall, 2),
        "seconds submit -> first batch": round(calls[0][0] - sent_at, 2),
        "seconds last batch -> job ended": round(ended_at - calls[-1][1], 2),
        "worker processes that ran batches": len(by_pid),
        "per-batch overhead ms": {
            "p50": round(rank(gaps, 0.5), 3),
            "p99": round(rank(gaps, 0.99), 3),
        },
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    config = workdir / "modelmux.yaml"
    spec = {"name": API, "kind": "BatchAPI", "handler": {"type": "python", "path": str(HANDLER)}}
    gateway_config = {
        "listen": "127.0.0.1:0",
        "log_requests": False,
        "state_dir": str(workdir / "state"),
    }
    config.write_text(yaml.safe_dump({"gateway": gateway_config, "apis": [spec]}))
    items = list(range(args.items))
    sleep = args.handler_ms / 1000
    results: dict[str, Any] = {
        "loop items/s": round(
            loop(items, args.batch_size, {"log": str(workdir / "loop.log"), "sleep": sleep}), 1
        )
    }
    gateway = Child("gateway", [*MODELMUX, "gateway", "--config", str(config)], logdir=workdir)
    try:
        health_serving(gateway.wait_serving(60), timeout=60)
        with Client(gateway.address, timeout=60) as client:
            job(client, items[:20], workers=1, batch_size=1, log=workdir / "warmup.log", sleep=0)
            for workers in args.workers:
                log = workdir / f"job-{workers}.log"
                results[f"job, {workers} workers"] = job(
                    client, items, workers=workers, batch_size=args.batch_size, log=log, sleep=sleep
                )
    finally:
        gateway.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000, help="items per job")
    parser.add_argument("--batch-size", type=int, default=1, help="items per batch")
    parser.add_argument(
        "--workers", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2], help="e.g. 1,2"
    )
    parser.add_argument(
        "--handler-ms", type=float, default=0.0, help="handle_batch also sleeps this long"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        results = run(args, Path(tmp))
    print(
        f"batch scenario, {args.items} items in batches of {args.batch_size}, handler "
        f"{args.handler_ms:g} ms per batch, embedded store:"
    )
    print(f"  plain loop in one process   {results['loop items/s']:>12} items/s")
    for name, figures in results.items():
        if name.startswith("job"):
            overhead = figures["per-batch overhead ms"]
            print(
                f"  {name:27s} {figures['items/s end to end']:>12} items/s end to end, "
                f"{figures['items/s while running']} while running; per-batch overhead "
                f"p50 {overhead['p50']} ms, p99 {overhead['p99']} ms; submit -> first batch "
                f"{figures['seconds submit -> first batch']} s, last batch -> ended "
                f"{figures['seconds last batch -> job ended']} s"
            )
    first = next(v for k, v in results.items() if k.startswith("job"))
    p50 = first["per-batch overhead ms"]["p50"]
    verdict = "met" if p50 <= TARGET_OVERHEAD_MS else "NOT met"
    print(f"  per-batch overhead p50 {p50} ms (target <= {TARGET_OVERHEAD_MS} ms: {verdict})")
    args.out.mkdir(exist_ok=True)
    out = args.out / f"bench-batch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {"items": args.items, "batch_size": args.batch_size, "results": results}, indent=2
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MODELMUX_LOG_FORMAT", "json")
    sys.exit(main())

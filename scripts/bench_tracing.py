#!/usr/bin/env python3
"""What tracing costs the request path's own Python, in one process and without gRPC: one Predict
through the edge and the forwarder to an in-memory backend (the unit tier's), with tracing off,
on with every call sampled out, and on with every call sampled in (spans through a batch span
processor to an exporter that drops them: the export's own cost is not in these figures; the
sampled-in gateway of scripts/bench.py pays it too). CPU time per call, median of rounds.

    .venv/bin/python scripts/bench_tracing.py             # off, sampled out, sampled in
    .venv/bin/python scripts/bench_tracing.py --off-only  # runs on a tree without tracing too

With tracing off it also reports how many OpenTelemetry modules the path imported (none is the
claim of docs/tracing.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from unit.unit_helpers import Context, endpoint, predict_reply, table  # noqa: E402

from gateway.edge import Lifecycle, edge  # noqa: E402
from gateway.forwarding import Forwarder  # noqa: E402
from gateway.request import resolve  # noqa: E402
from gateway.routing import Target  # noqa: E402

REPLY = predict_reply()


async def _answer(method: str, data: bytes) -> bytes:
    return REPLY


def _path() -> Callable[[bytes, Any], Awaitable[bytes]]:
    """An edge built now (so with the tracing in force now) over a forwarder to one backend."""
    routes = table({1: (Target(endpoint("b", _answer), "m", True),)})
    forwarder = Forwarder(timeout=5.0, backend_max_inflight=10)

    async def handle(data: bytes, context: Any, call: Any) -> bytes:
        request = resolve(routes, "Predict", data, model="m", version=None, label=None)
        return await forwarder.send(request, context, call)

    rpc = "tensorflow.serving.PredictionService/Predict"
    return edge(rpc, handle, log_requests=False, lifecycle=Lifecycle())  # type: ignore[arg-type]


async def _per_call(calls: int, rounds: int) -> float:
    run = _path()
    for _ in range(calls // 10):
        await run(b"", Context())
    times = []
    for _ in range(rounds):
        started = time.process_time()  # every thread of the process: the span processor's too
        for _ in range(calls):
            await run(b"", Context())
        times.append((time.process_time() - started) / calls * 1e6)
    return statistics.median(times)


def _sampled(sampler: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    from modelmux_common import tracing

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    chosen = ALWAYS_ON if sampler == "on" else ALWAYS_OFF
    provider = TracerProvider(sampler=ParentBased(chosen))
    # a queue that holds a round's spans: none dropped for want of room
    provider.add_span_processor(BatchSpanProcessor(Dropped(), max_queue_size=1 << 20))
    tracing.install(provider)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--off-only", action="store_true")
    args = parser.parse_args(argv)
    off = await _per_call(args.calls, args.rounds)
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
    print(
        f"off           {off:6.1f} us per call  (OpenTelemetry modules imported: {len(imported)})"
    )
    if args.off_only:
        return 0
    for name, sampler in (("sampled out", "off"), ("sampled in", "on")):
        _sampled(sampler)
        from modelmux_common import tracing

        cost = await _per_call(args.calls, args.rounds)
        tracing.shutdown()
        print(f"{name:13s} {cost:6.1f} us per call  (+{cost - off:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

#!/usr/bin/env python3
"""Draws the main panels of deploy/grafana/modelmux.json from real data (docs/metrics.md).

Starts an embedded backend (a 5 ms device stand-in), modelsync over a local folder and a gateway
following it, each with its /metrics endpoint; sends known traffic (steady calls, calls for an
unknown model, an overload burst past ``gateway.max_inflight``, a new model version published
half-way) while scraping the three endpoints every second; then evaluates each main panel's own
queries over the scraped samples and draws them with matplotlib. It is a rendering of the
dashboard's panels, not a Grafana screenshot: the few query shapes the panels use are evaluated
here (``sum by``/``max by`` of a gauge, ``sum by (rate(...))``, ``histogram_quantile``).

    .venv/bin/python scripts/render_dashboard.py --out docs/img/dashboard.png
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from bench_stack import MODELMUX, ROOT, Stack, free_port, health_serving
from prometheus_client.parser import text_string_to_metric_families

from modelmux_common.tfserving import predict_pb2

DASHBOARD = ROOT / "deploy" / "grafana" / "modelmux.json"
PANELS = (
    "Calls per second by status code",
    "Call latency p50 / p99 by method",
    "Calls per second by model and version",
    "Backend call latency p50 / p99",
    "In-flight calls by limit",
    "Admission rejections per second by limit",
    "Versions by backend and state",
    "Embedded backend calls per second",
)
RATE_WINDOW = 5.0  # what $__rate_interval stands for, with a scrape every second
DURATION = 80.0
BURST = (25.0, 35.0)  # seconds into the run: 16 callers at once, past max_inflight
PUBLISH_AT = 45.0  # version 2 is copied into the source
Series = dict[frozenset[tuple[str, str]], float]
Scrape = tuple[float, dict[str, Series]]

# ---- a small evaluator for the panels' query shapes -------------------------------------------

_SEL = r"(\w+)\{([^}]*)\}"
_RATE = re.compile(rf"^sum by \(([^)]*)\) \(rate\({_SEL}\[[^\]]+\]\)\)$")
_QUANTILE = re.compile(
    rf"^histogram_quantile\(([\d.]+), sum by \(([^)]*)\) \(rate\({_SEL}\[[^\]]+\]\)\)\)$"
)
_GAUGE = re.compile(rf"^(sum|max) by \(([^)]*)\) \({_SEL}\)$")
_MATCHER = re.compile(r'(\w+)\s*(=~|!=|=)\s*"([^"]*)"')


def _matches(labels: frozenset[tuple[str, str]], matchers: str) -> bool:
    have = dict(labels)
    for name, op, want in _MATCHER.findall(matchers):
        if op == "=~":
            continue  # only the dashboard's job=~"$job"
        if (have.get(name, "") == want) != (op == "="):
            return False
    return True


def _group(labels: frozenset[tuple[str, str]], by: list[str]) -> tuple[tuple[str, str], ...]:
    have = dict(labels)
    return tuple((name, have.get(name, "")) for name in by)


def _rates(
    scrapes: list[Scrape], i: int, name: str, matchers: str, by: list[str]
) -> dict[Any, float]:
    """sum by (by) (rate(name{matchers}[RATE_WINDOW])) at scrape ``i``."""
    now, samples = scrapes[i]
    j = i
    while j > 0 and now - scrapes[j][0] < RATE_WINDOW:
        j -= 1
    then, old = scrapes[j]
    out: dict[Any, float] = {}
    if now <= then:
        return out
    for labels, value in samples.get(name, {}).items():
        if _matches(labels, matchers):
            before = old.get(name, {}).get(labels, 0.0)
            key = _group(labels, by)
            out[key] = out.get(key, 0.0) + max(0.0, value - before) / (now - then)
    return out


def _quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative per-second bucket counts."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return math.nan


def evaluate(expr: str, scrapes: list[Scrape], i: int) -> dict[Any, float]:
    """One query at scrape ``i``: {label values: value}."""
    if m := _RATE.match(expr):
        return _rates(scrapes, i, m[2], m[3], [b.strip() for b in m[1].split(",")])
    if m := _QUANTILE.match(expr):
        by = [b.strip() for b in m[2].split(",")]
        rates = _rates(scrapes, i, m[3], m[4], by)
        groups: dict[Any, dict[float, float]] = {}
        for key, rate in rates.items():
            labels = dict(key)
            rest = tuple((n, v) for n, v in key if n != "le")
            groups.setdefault(rest, {})[float(labels["le"])] = rate
        return {key: _quantile(float(m[1]), b) for key, b in groups.items()}
    if m := _GAUGE.match(expr):
        combine: Callable[[float, float], float] = max if m[1] == "max" else (lambda a, b: a + b)
        by = [b.strip() for b in m[2].split(",")]
        out: dict[Any, float] = {}
        for labels, value in scrapes[i][1].get(m[3], {}).items():
            if _matches(labels, m[4]):
                key = _group(labels, by)
                out[key] = combine(out[key], value) if key in out else value
        return out
    raise ValueError(f"a query shape this rendering does not evaluate: {expr}")


def legend(fmt: str, key: tuple[tuple[str, str], ...]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: dict(key).get(m[1], ""), fmt)


# ---- the stack, its traffic and the scrapes ---------------------------------------------------


def scrape(port: int) -> dict[str, Series]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, Series] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def start(stack: Stack, models: Path, workdir: Path) -> tuple[str, Path, list[int]]:
    """The three daemons on one config; (gateway address, source folder, metrics ports)."""
    source = workdir / "source" / "half_plus_two"
    shutil.copytree(models / "half_plus_two" / "1", source / "1")
    config = workdir / "modelmux.yaml"
    doc = {
        "gateway": {"listen": "127.0.0.1:0", "log_requests": False, "max_inflight": 8,
                    "status_interval": "200ms", "metrics_listen": "127.0.0.1:0"},
        "modelsync": {"listen": "127.0.0.1:0", "target": str(workdir / "volume"), "settle": "0s",
                      "debounce": "200ms", "metrics_listen": "127.0.0.1:0"},
        "backends": [{"name": "cpu-0", "address": f"127.0.0.1:{free_port()}",
                      "metrics_listen": "127.0.0.1:0"}],
        "apis": [{"name": "hpt", "handler": {"models": {"paths": [
            {"name": "half_plus_two", "path": str(source)}]}}}],
    }  # fmt: skip
    config.write_text(yaml.safe_dump(doc))
    backend = stack.spawn(
        "backend",
        [*MODELMUX, "backend", "--config", str(config), "--name", "cpu-0", "--device-time", "5ms"],
    )
    backend.wait_serving(180)
    sync = stack.spawn("modelsync", [*MODELMUX, "sync", "--config", str(config)])
    sync.wait_serving(60)
    gateway = stack.spawn(
        "gateway",
        [*MODELMUX, "gateway", "--config", str(config)],
        env={"MODELMUX_GATEWAY_MODELSYNC": sync.address},
    )
    address = gateway.wait_serving(60)
    health_serving(address, timeout=60)
    ports = [
        int(c.wait_log(lambda e: e.get("event") == "metrics", timeout=10, what="metrics")["port"])
        for c in (gateway, sync, backend)
    ]
    return address, source, ports


async def traffic(address: str, source: Path, models: Path, started: float) -> None:
    """Steady calls (latest and version 1), 1/s for an unknown model, a burst, a new version."""
    request = predict_pb2.PredictRequest()
    request.inputs["x"].dtype = 1  # DT_FLOAT
    request.inputs["x"].float_val.extend([1.0, 2.0, 5.0])
    request.inputs["x"].tensor_shape.dim.add(size=3)

    def spec(model: str, version: int | None) -> bytes:
        out = predict_pb2.PredictRequest()
        out.CopyFrom(request)
        out.model_spec.name = model
        if version is not None:
            out.model_spec.version.value = version
        return out.SerializeToString()

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")

        async def caller(data: bytes, every: float, until: Callable[[float], bool]) -> None:
            while (now := time.monotonic() - started) < DURATION:
                if until(now):
                    # the rejections and NOT_FOUNDs are what the panels show
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await call(data, timeout=5)
                await asyncio.sleep(every)

        def burst(now: float) -> bool:
            return BURST[0] <= now < BURST[1]

        async def publish() -> None:
            await asyncio.sleep(max(0.0, PUBLISH_AT - (time.monotonic() - started)))
            shutil.copytree(models / "half_plus_two" / "2", source / "2")

        await asyncio.gather(
            *(caller(spec("half_plus_two", None), 0.02, lambda t: True) for _ in range(2)),
            caller(spec("half_plus_two", 1), 0.1, lambda t: True),
            caller(spec("no_such_model", None), 1.0, lambda t: True),
            *(caller(spec("half_plus_two", None), 0.0, burst) for _ in range(16)),
            publish(),
        )


def collect(ports: list[int], started: float, stop: threading.Event, out: list[Scrape]) -> None:
    while not stop.wait(max(0.0, 1.0 - (time.monotonic() - started) % 1.0)):
        merged: dict[str, Series] = {}
        for port in ports:
            for name, series in scrape(port).items():
                merged.setdefault(name, {}).update(series)
        out.append((time.monotonic() - started, merged))


# ---- drawing ----------------------------------------------------------------------------------


def draw(scrapes: list[Scrape], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    by_title = {p["title"]: p for p in dashboard["panels"] if p.get("type") != "row"}
    fig, axes = plt.subplots(4, 2, figsize=(14, 13), dpi=80)
    times = [t for t, _ in scrapes]
    for ax, title in zip(axes.flat, PANELS, strict=True):
        panel = by_title[title]
        for target in panel["targets"]:
            series: dict[Any, list[float]] = {}
            for i in range(len(scrapes)):
                for key, v in evaluate(target["expr"], scrapes, i).items():
                    series.setdefault(key, [math.nan] * len(scrapes))[i] = v
            for key, values in sorted(series.items()):
                ax.plot(times, values, label=legend(target["legendFormat"], key), linewidth=1.2)
        unit = panel["fieldConfig"]["defaults"]["unit"]
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel({"s": "seconds", "reqps": "calls/s"}.get(unit, ""), fontsize=8)
        if unit == "s":
            ax.set_yscale("log")
        ax.axvspan(*BURST, color="0.9", zorder=0)
        ax.axvline(PUBLISH_AT, color="0.6", linestyle=":", linewidth=1)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the run (grey: overload burst; dotted: version 2 published)")
    fig.suptitle(
        "modelmux dashboard (deploy/grafana/modelmux.json): its main panels' queries evaluated "
        "over real scrapes, drawn with matplotlib - not a Grafana screenshot",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / ".modelmux" / "source")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelmux-dashboard-") as tmp:
        stack = Stack(Path(tmp))
        try:
            address, source, ports = start(stack, args.models, Path(tmp))
            scrapes: list[Scrape] = []
            stop = threading.Event()
            started = time.monotonic()
            scraper = threading.Thread(target=collect, args=(ports, started, stop, scrapes))
            scraper.start()
            try:
                asyncio.run(traffic(address, source, args.models, started))
            finally:
                stop.set()
                scraper.join()
        finally:
            stack.close()
    draw(scrapes, args.out)
    print(f"wrote {args.out} from {len(scrapes)} scrapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

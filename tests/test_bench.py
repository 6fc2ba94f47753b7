"""Smoke test of the benchmark harness (scripts/bench.py) in its quick mode: it starts the stack,
measures a few targets with few calls, stops every child and writes JSON with the expected keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

TARGETS = "direct-latest,barehop-latest,facade-latest,facade-batched,own-typed,own-json,invoke"


def test_quick_run_writes_results(example_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--quick",
            "--load",
            "python",
            *("--scenarios", "small,metrics,latency,large,bottleneck,memory,start,reload"),
            *("--targets", TARGETS),
            *("--models", str(example_models), "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "load generator: python" in done.stdout
    files = list(out.glob("bench-*.json"))
    assert len(files) == 1
    results = json.loads(files[0].read_text())

    assert {
        "meta",
        "small",
        "latency",
        "large",
        "metrics",
        "memory",
        "start",
        "reload",
        "targets_check",
    } <= set(results)
    assert results["meta"]["load_generator"] == "python"
    small = results["small"]["targets"]
    assert set(small) == set(TARGETS.split(","))
    for name in (
        "barehop-latest",
        "facade-latest",
        "facade-batched",
        "own-typed",
        "own-json",
        "invoke",
    ):
        row = small[name]
        assert row["p50_us"] > 0 and row["p99_us"] >= row["p50_us"]
        assert row["rps"] > 0 and row["hop_cpu_us"] > 0
        assert row["cpu_x_barehop"] is not None and row["added_p50_us"] is not None
    latency = results["latency"]["targets"]
    assert set(latency) == set(TARGETS.split(","))
    for name in ("barehop-latest", "facade-latest", "facade-batched"):
        row = latency[name]
        assert 0 < row["p50_us"] <= row["p90_us"] <= row["p99_us"]
        assert row["added_p50_us"] is not None and row["added_p50_x_barehop"] is not None
    assert "interleaved call by call" in done.stdout
    # invoke: the gateway's CPU plus its handler worker's, both parts also recorded apart
    invoke = small["invoke"]
    assert invoke["gateway_cpu_us"] > 0 and invoke["workers_cpu_us"] > 0
    assert invoke["hop_cpu_us"] == pytest.approx(
        invoke["gateway_cpu_us"] + invoke["workers_cpu_us"]
    )
    handler = results["handler"]
    assert handler["compared_with"] == "own-json" and handler["cpu_x_own_sat"] > 0
    assert results["gateway_idle"]["handler_workers"] == 1
    assert "invoke (TF handler) added p50 vs own-json" in done.stdout
    assert "gateway+worker" in done.stdout
    large = results["large"]["targets"]
    assert large["facade-latest"]["s_per_call"] > 0 and large["facade-latest"]["x_direct"] > 0
    bottleneck = results["bottleneck"]
    assert bottleneck["direct_rps"] > 0 and bottleneck["rps_x_direct"] > 0
    assert "device stand-in" in done.stdout
    assert results["memory"]["modelsync"]["idle_rss_mib"] > 0
    assert results["gateway_idle"]["rss_mib"] > 0
    assert results["start"]["modelsync"]["serving_s"] > 0
    assert results["reload"]["measurable"] in (True, False) and results["reload"]["summary"]
    s3 = results["reload"].get("s3", {})  # absent when the local reload was not measurable
    assert not s3 or s3["summary"].startswith("S3")
    assert not s3.get("measurable") or s3["first_answer_s"] > 0
    assert "facade-latest" in done.stdout and "issue targets" in done.stdout
    metrics = results["metrics"]  # the request path in-process, metrics off and on
    assert 0 < metrics["off_us"] < metrics["on_us"] and metrics["x_facade"] > 1
    assert "metrics, the request path in-process" in done.stdout


def test_batch_scenario_quick_run(tmp_path: Path) -> None:
    """scripts/bench_batch.py on a small job: every figure measured, the JSON written."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_batch.py"),
            "--items",
            "30",
            "--workers",
            "1,2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("bench-batch-*.json")
    results = json.loads(path.read_text())["results"]
    assert results["loop items/s"] > 0
    for workers in (1, 2):
        figures = results[f"job, {workers} workers"]
        assert figures["batches"] == 30 and figures["items/s end to end"] > 0
        assert figures["per-batch overhead ms"]["p50"] >= 0
    assert "per-batch overhead p50" in done.stdout

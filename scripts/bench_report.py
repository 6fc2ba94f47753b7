"""Benchmark results: ratios, the issue's targets checked, the machine, and the printed table."""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench_load import median
from bench_stack import ROOT


def _div(a: float, b: float) -> float:
    if b is None or a is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def add_ratios(summary: dict[str, dict[str, Any]], refs: Mapping[str, tuple[str, str]]) -> None:
    """Adds, per target, figures relative to its direct target and to its bare-hop target."""
    for name, row in summary.items():
        base_name, floor_name = refs[name]
        base = summary.get(base_name)
        floor = summary.get(floor_name) if floor_name else None
        if base is not None:
            row["added_p50_us"] = row["p50_us"] - base["p50_us"]
            row["added_p99_us"] = row["p99_us"] - base["p99_us"]
            row["p50_x_direct"] = _div(row["p50_us"], base["p50_us"])
            row["rps_x_direct"] = _div(row["rps"], base["rps"])
        if floor is not None and base is not None:
            floor_added = floor["p50_us"] - base["p50_us"]
            row["added_p50_x_barehop"] = _div(row["added_p50_us"], floor_added)
            row["cpu_c1_x_barehop"] = _div(row["hop_cpu_us_c1"], floor["hop_cpu_us_c1"])
            row["cpu_x_barehop"] = _div(row["hop_cpu_us"], floor["hop_cpu_us"])
            paired = [
                _div(mine["hop_cpu_us"], theirs["hop_cpu_us"])
                for mine, theirs in zip(
                    row.get("rounds", []), floor.get("rounds", []), strict=False
                )
            ]
            row["cpu_x_barehop_per_round"] = paired


def add_versus(summary: dict[str, dict[str, Any]], versus: Mapping[str, str]) -> None:
    """Adds ``cpu_x_<other>`` (saturation) and ``cpu_c1_x_<other>`` (c=1) to each target of
    ``versus``, against the target it names, with the per-round ratios (rounds run back to back)."""
    for name, other in versus.items():
        row, theirs = summary.get(name), summary.get(other)
        if row is None or theirs is None:
            continue
        for suffix, key in (("", "hop_cpu_us"), ("_c1", "hop_cpu_us_c1")):
            row[f"cpu{suffix}_x_{other}"] = _div(row[key], theirs[key])
            row[f"cpu{suffix}_x_{other}_per_round"] = [
                _div(mine[key], base[key])
                for mine, base in zip(row.get("rounds", []), theirs.get("rounds", []), strict=False)
            ]


def add_latency_ratios(
    summary: dict[str, dict[str, Any]], refs: Mapping[str, tuple[str, str]]
) -> None:
    """The interleaved latency scenario's added p50 (to the direct target) and its ratio to the
    bare hop's."""
    for name, row in summary.items():
        base_name, floor_name = refs[name]
        base, floor = summary.get(base_name), summary.get(floor_name)
        if base is None:
            continue
        row["added_p50_us"] = row["p50_us"] - base["p50_us"]
        if floor is not None:
            row["added_p50_x_barehop"] = _div(row["added_p50_us"], floor["p50_us"] - base["p50_us"])


def cpu_against(
    summary: Mapping[str, Mapping[str, Any]], base: str, names: tuple[str, ...]
) -> dict[str, Any]:
    """Each of ``names``' CPU per call against ``base``'s, at concurrency 1 and at saturation:
    the median of the per-round ratios (the targets of one round ran minutes apart at most).
    Empty when ``base`` or none of ``names`` was measured."""
    if base not in summary:
        return {}
    out: dict[str, Any] = {}
    for name in (n for n in names if n in summary):
        row: dict[str, Any] = {"compared_with": base}
        for suffix, label in (("_c1", "c1"), ("", "sat")):
            key = f"hop_cpu_us{suffix}"
            ratios = [
                _div(a[key], b[key])
                for a, b in zip(summary[name]["rounds"], summary[base]["rounds"], strict=False)
            ]
            row[f"cpu_us_{label}"] = summary[name][key]
            row[f"cpu_x_{label}"] = median(ratios) if ratios else math.nan
            row[f"cpu_x_{label}_per_round"] = ratios
        out[name] = row
    return out


def cpu_lines(rows: Mapping[str, Mapping[str, Any]], what: str) -> list[str]:
    return [
        f"  {what} {name}: CPU per call x{_f(row['cpu_x_c1'], '.3f')} at c=1,"
        f" x{_f(row['cpu_x_sat'], '.3f')} at saturation against {row['compared_with']}"
        f" ({_f(row['cpu_us_c1'], '.0f')} / {_f(row['cpu_us_sat'], '.0f')} us)"
        for name, row in rows.items()
    ]


def handler_summary(
    summary: Mapping[str, Mapping[str, Any]], invoke: str, own: str
) -> dict[str, Any]:
    """What the handler adds: the ``invoke`` target (JSON through a TensorFlow handler in a worker
    process) against ``own`` (the same JSON through the gateway's own Predict, no handler).

    Latency: invoke's p50 minus own's (medians over rounds), and the median of the per-round
    differences. CPU: invoke's gateway + worker processes per call against own's gateway, at
    concurrency 1 and at saturation; the parts (gateway, workers) are kept apart as well.
    Empty when either target was not measured.
    """
    mine, theirs = summary.get(invoke), summary.get(own)
    if mine is None or theirs is None:
        return {}
    paired = [
        a["p50_us"] - b["p50_us"]
        for a, b in zip(mine.get("rounds", []), theirs.get("rounds", []), strict=False)
    ]
    out: dict[str, Any] = {
        "target": invoke,
        "compared_with": own,
        "p50_us": mine["p50_us"],
        "added_p50_us": mine["p50_us"] - theirs["p50_us"],
        "added_p50_us_per_round": paired,
        "added_p50_us_median_of_rounds": median(paired) if paired else math.nan,
        "added_p99_us": mine["p99_us"] - theirs["p99_us"],
        "rps": mine["rps"],
        "rps_x_own": _div(mine["rps"], theirs["rps"]),
    }
    for suffix, label in (("_c1", "c1"), ("", "sat")):
        total = mine[f"hop_cpu_us{suffix}"]
        out[f"cpu_us_{label}"] = total
        out[f"gateway_cpu_us_{label}"] = mine.get(f"gateway_cpu_us{suffix}", math.nan)
        out[f"workers_cpu_us_{label}"] = mine.get(f"workers_cpu_us{suffix}", math.nan)
        out[f"own_cpu_us_{label}"] = theirs[f"hop_cpu_us{suffix}"]
        out[f"cpu_x_own_{label}"] = _div(total, theirs[f"hop_cpu_us{suffix}"])
    return out


def handler_lines(handler: Mapping[str, Any]) -> list[str]:
    """The report's lines on the handler: added latency and CPU against own-json."""
    if not handler:
        return []
    h = handler
    return [
        f"{h['target']} (TF handler) added p50 vs {h['compared_with']}:"
        f" {_f(h['added_p50_us'] / 1000, '+.3f')} ms"
        f" (median of per-round differences {_f(h['added_p50_us_median_of_rounds'] / 1000, '+.3f')}"
        f" ms; p50 {_f(h['p50_us'] / 1000, '.3f')} ms); rps {_f(h['rps'], '.0f')}"
        f" ({_f(h['rps_x_own'], '.2f')}x {h['compared_with']})",
        f"{h['target']} CPU/call gateway+worker vs {h['compared_with']} gateway:"
        f" {_f(h['cpu_x_own_sat'], '.2f')}x at saturation"
        f" ({_f(h['cpu_us_sat'], '.0f')} us = gateway {_f(h['gateway_cpu_us_sat'], '.0f')}"
        f" + worker {_f(h['workers_cpu_us_sat'], '.0f')}, against {_f(h['own_cpu_us_sat'], '.0f')}),"
        f" {_f(h['cpu_x_own_c1'], '.2f')}x at c=1"
        f" ({_f(h['cpu_us_c1'], '.0f')} us = gateway {_f(h['gateway_cpu_us_c1'], '.0f')}"
        f" + worker {_f(h['workers_cpu_us_c1'], '.0f')}, against {_f(h['own_cpu_us_c1'], '.0f')})",
    ]


def large_summary(
    *,
    targets: Mapping[str, tuple[str, str]],
    times: Mapping[str, list[float]],
    cpu: Mapping[str, list[float]],
    megabytes: int,
) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for name, (_, process) in targets.items():
        rows[name] = {
            "s_per_call": median(times[name]),
            "hop_cpu_ms_per_call": median(cpu[name]) * 1000 if process != "backend" else math.nan,
            "calls": times[name],
        }
    for name, (base, _) in targets.items():
        if base in rows:
            rows[name]["x_direct"] = _div(rows[name]["s_per_call"], rows[base]["s_per_call"])
    return {"megabytes": megabytes, "targets": rows}


# ---- the issue's targets -------------------------------------------------------------------------


def _get(results: Mapping[str, Any], *path: str) -> float:
    node: Any = results
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return math.nan
        node = node[key]
    return float(node) if isinstance(node, int | float) else math.nan


_S = ("small", "targets")
_L = ("large", "targets")
_I = ("latency", "targets")
# (what, limit, where in the results, True when the figure must be at least the limit)
ISSUE_TARGETS = (
    ("facade-latest CPU/call vs bare hop (saturation)", 1.15, (*_S, "facade-latest", "cpu_x_barehop"), False),
    ("facade-latest CPU/call vs bare hop (c=1)", 1.15, (*_S, "facade-latest", "cpu_c1_x_barehop"), False),
    ("facade-v2 CPU/call vs bare hop (saturation)", 1.15, (*_S, "facade-v2", "cpu_x_barehop"), False),
    ("facade-latest added p50 vs bare hop's (c=1)", 1.15, (*_S, "facade-latest", "added_p50_x_barehop"), False),
    ("facade-v2 added p50 vs bare hop's (c=1)", 1.15, (*_S, "facade-v2", "added_p50_x_barehop"), False),
    ("facade-latest added p50 vs bare hop's (c=1, interleaved)", 1.15, (*_I, "facade-latest", "added_p50_x_barehop"), False),
    ("facade-v2 added p50 vs bare hop's (c=1, interleaved)", 1.15, (*_I, "facade-v2", "added_p50_x_barehop"), False),
    ("facade-latest CPU/call, metrics on vs off (saturation)", 1.05, (*_S, "facade-latest-metrics", "cpu_x_facade-latest"), False),
    ("facade-latest CPU/call, metrics on vs off (c=1)", 1.05, (*_S, "facade-latest-metrics", "cpu_c1_x_facade-latest"), False),
    ("facade-latest CPU/call + what metrics add to the request path in-process", 1.05, ("metrics", "x_facade"), False),
    ("own-typed CPU/call vs bare hop (saturation)", 1.5, (*_S, "own-typed", "cpu_x_barehop"), False),
    ("40 MB facade-v2 time vs direct", 1.25, (*_L, "facade-v2", "x_direct"), False),
    ("40 MB facade-latest time vs direct", 1.25, (*_L, "facade-latest", "x_direct"), False),
    ("idle gateway RSS, MiB", 100.0, ("gateway_idle", "rss_mib"), False),
    ("gateway start to SERVING, s (warm backend)", 2.0, ("start", "modelsync", "serving_s"), False),
    ("facade-latest throughput vs direct (at least)", 0.9, (*_S, "facade-latest", "rps_x_direct"), True),
    ("facade-batched throughput vs direct (at least; server-side batching)", 0.9, (*_S, "facade-batched", "rps_x_direct"), True),
    ("facade-latest throughput vs direct, the backend the bottleneck (at least)", 0.9, ("bottleneck", "rps_x_direct"), True),
)  # fmt: skip


def issue_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with the figure measured in this run (NaN when not measured)."""
    out = []
    for what, limit, path, at_least in ISSUE_TARGETS:
        value = _get(results, *path)
        met = None if math.isnan(value) else (value >= limit if at_least else value <= limit)
        out.append({"what": what, "measured": value, "target": limit, "met": met})
    return out


# ---- machine -------------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _commit() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=10,
        check=False,
    )
    return done.stdout.strip() or "?"


def machine(load: str) -> dict[str, Any]:
    import google.protobuf
    import grpc

    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "nginx": _version(["nginx", "-v"]),
        "h2load": _version(["h2load", "--version"]),
        "load_generator": load,
        "commit": _commit(),
    }


# ---- the table -----------------------------------------------------------------------------------


def _f(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def small_table(small: Mapping[str, Any]) -> str:
    header = [
        "target", "p50 ms", "p99 ms", "+p50 ms", "+p50/bare", "rps", "rps/direct",
        "cpu us c1", "cpu/bare c1", "cpu us sat", "cpu/bare sat", "backend us",
    ]  # fmt: skip
    rows = []
    for name, r in small["targets"].items():
        rows.append(
            [
                name,
                _f(r["p50_us"] / 1000, ".3f"),
                _f(r["p99_us"] / 1000, ".3f"),
                _f(r.get("added_p50_us", math.nan) / 1000, "+.3f"),
                _f(r.get("added_p50_x_barehop"), ".2f"),
                _f(r["rps"], ".0f"),
                _f(r.get("rps_x_direct"), ".2f"),
                _f(r["hop_cpu_us_c1"], ".0f"),
                _f(r.get("cpu_c1_x_barehop"), ".2f"),
                _f(r["hop_cpu_us"], ".0f"),
                _f(r.get("cpu_x_barehop"), ".2f"),
                _f(r["backend_cpu_us"], ".0f"),
            ]
        )
    return _grid(header, rows)


def latency_table(latency: Mapping[str, Any]) -> str:
    header = ["target", "p50 ms", "p90 ms", "p99 ms", "+p50 ms", "+p50/bare"]
    rows = [
        [
            name,
            _f(r["p50_us"] / 1000, ".3f"),
            _f(r["p90_us"] / 1000, ".3f"),
            _f(r["p99_us"] / 1000, ".3f"),
            _f(r.get("added_p50_us", math.nan) / 1000, "+.3f"),
            _f(r.get("added_p50_x_barehop"), ".2f"),
        ]
        for name, r in latency["targets"].items()
    ]
    return _grid(header, rows)


def large_table(large: Mapping[str, Any]) -> str:
    header = ["target", "s/call", "x direct", "hop cpu ms/call"]
    rows = [
        [
            name,
            _f(r["s_per_call"], ".3f"),
            _f(r.get("x_direct"), ".2f"),
            _f(r["hop_cpu_ms_per_call"], ".0f"),
        ]
        for name, r in large["targets"].items()
    ]
    return _grid(header, rows)


def _memory_lines(results: Mapping[str, Any]) -> list[str]:
    lines = []
    idle = results.get("gateway_idle", {})
    if idle:
        lines.append(
            f"gateway RSS idle after start: {_f(idle.get('rss_mib'), '.1f')} MiB (following"
            f" modelsync), {_f(idle.get('static_rss_mib'), '.1f')} MiB (local folders)"
        )
    if idle.get("handler_gateway_rss_mib") is not None:
        lines.append(
            f"gateway with the bench handler, RSS idle after start:"
            f" {_f(idle['handler_gateway_rss_mib'], '.1f')} MiB (gateway) +"
            f" {_f(idle.get('handler_workers_rss_mib'), '.1f')} MiB"
            f" ({idle.get('handler_workers')} handler worker process"
            f"{'' if idle.get('handler_workers') == 1 else 'es'})"
        )
    for key, label in (("gateway_after_small", "small"), ("gateway_after_large", "large")):
        entry = results.get(key)
        if entry:
            lines.append(
                f"gateway RSS after the {label} scenario: {_f(entry['rss_mib'], '.1f')} MiB"
                f" (peak {_f(entry['peak_rss_mib'], '.1f')} MiB)"
            )
    sync = results.get("memory", {}).get("modelsync", {})
    if sync:
        lines.append(
            f"modelsync RSS idle: {_f(sync.get('idle_rss_mib'), '.1f')} MiB; after mirroring a"
            f" {sync.get('asset_mb')} MB version: {_f(sync.get('loaded_rss_mib'), '.1f')} MiB"
            f" (peak {_f(sync.get('peak_rss_mib'), '.1f')} MiB)"
        )
    return lines


def _status_lines(results: Mapping[str, Any]) -> list[str]:
    lines = []
    first = results.get("gateway_first_start", {})
    for mode, entry in results.get("start", {}).items():
        lines.append(
            f"gateway start ({mode}): serving line {_f(entry['listening_s'], '.2f')} s, health"
            f" SERVING {_f(entry['serving_s'], '.2f')} s (warm backend, median of"
            f" {len(entry['rounds'])}), idle RSS {_f(entry['idle_rss_mib'], '.1f')} MiB"
        )
    if first:
        lines.append(
            f"first gateway start, models loading in the backend: SERVING after"
            f" {_f(first.get('serving_s'), '.2f')} s"
        )
    for key in ("workers", "bottleneck", "reload"):
        entry = results.get(key)
        if entry:
            lines.append(f"{key}: {entry.get('summary', entry)}")
    return lines


def table(results: Mapping[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        f"\nmodelmux bench  {meta['commit']}  {meta['nproc']} x {meta['cpu_model']}  Python"
        f" {meta['python']}  grpcio {meta['grpcio']}  load: {meta['load_generator']}"
    ]
    if "small" in results:
        s = results["small"]
        parts.append(
            f"\nsmall Predict (half_plus_two, 3 floats): {s['calls_c1']} calls at c=1 and"
            f" {s['calls_saturation']} at c={s['concurrency']} per target and round, median of"
            f" {s['rounds']} rounds; cpu = the hop process's CPU per call (invoke: the gateway"
            f" plus its handler worker process)\n"
        )
        parts.append(small_table(s))
        lines = handler_lines(results.get("handler", {}))
        lines += cpu_lines(results.get("tracing", {}), "tracing")
        if lines:
            parts.append("")
            parts.extend(lines)
    if "metrics" in results:
        m = results["metrics"]
        parts.append(
            f"\nmetrics, the request path in-process ({m['rounds']} rounds of {m['calls']} calls):"
            f" {m['off_us']:.2f} us per call off, {m['on_us']:.2f} us on, {m['added_us']:.2f} us"
            " added"
        )
    if "latency" in results:
        parts.append(
            f"\nlatency at c=1, every target interleaved call by call (a sync Python client,"
            f" {results['latency']['calls']} calls per target)\n"
        )
        parts.append(latency_table(results["latency"]))
    if "large" in results:
        parts.append(f"\nlarge Predict ({results['large']['megabytes']} MB float32 tensor)\n")
        parts.append(large_table(results["large"]))
    parts.append("")
    parts.extend(_memory_lines(results) + _status_lines(results))
    parts.append("\nissue targets (ratios from this run)")
    for row in results.get("targets_check", []):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
        parts.append(
            f"  {row['what']}: {_f(row['measured'], '.2f')} (target {row['target']}) {verdict}"
        )
    rows = results.get("small", {}).get("targets", {})
    if "facade-latest" in rows and "barehop-uvloop" in rows:
        ratio = _div(rows["facade-latest"]["hop_cpu_us"], rows["barehop-uvloop"]["hop_cpu_us"])
        parts.append(
            "  like for like, no target: facade-latest CPU/call vs the bare hop on uvloop"
            f" (saturation): {_f(ratio, '.2f')}"
        )
    for text in results.get("notes", []):
        parts.append(f"note: {text}")
    return "\n".join(parts)


def clean(value: Any) -> Any:
    """NaN -> None, recursively, so the JSON is strict."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value

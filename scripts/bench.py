#!/usr/bin/env python3
"""``make bench``: the gateway measured side by side with direct calls, a bare hop and nginx.

One run starts everything it measures on free loopback ports (an embedded backend, the gateway
with request logging off and a second one with it on, one whose API has the TensorFlow handler of
scripts/bench_handler.py, the bare hop of scripts/bench_barehop.py (also on uvloop, the gateway's
event loop), nginx with grpc_pass when nginx
is installed, modelsync for its memory and the reload scenario),
measures each scenario, prints a table and writes JSON to bench-results/bench-<timestamp>.json.
Every figure is compared with calling the backend directly, and the gateway's costs with the bare
hop's, always from the same run. Load comes from h2load when it is installed, else from the
multi-process Python generator of scripts/bench_load.py; the output says which.

    .venv/bin/python scripts/bench.py                       # full run, < 10 minutes on 2 cores
    .venv/bin/python scripts/bench.py --quick               # a smoke run, about 30 s
    .venv/bin/python scripts/bench.py --scenarios small --targets facade-latest,barehop-latest
    .venv/bin/python scripts/bench.py --scenarios small --profile   # + py-spy profiles

Scenarios: small (p50/p99 at concurrency 1, throughput at saturation, CPU per call), large (one
40 MB float32 tensor per call), memory (RSS of gateway and modelsync), start (gateway start to
SERVING), workers (gateway --workers 1 vs 2), bottleneck (throughput from a backend with a device
stand-in, so the backend and not the CPU bounds it), reload (new version in a modelsync source to the
first answer from it). See docs/benchmarks.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import bench_lifecycle
import bench_metrics
import bench_report
import bench_requests as req
import grpc
from bench_load import H2Load, PythonLoad, Sample, median
from bench_stack import (
    ROOT,
    Child,
    Stack,
    gateway_config,
    model_config_file,
    modelsync_config,
)
from bench_targets import LARGE_TARGETS, QUICK, TARGETS, Settings, Target

SCENARIOS = (
    "small", "metrics", "latency", "large", "bottleneck", "memory", "start", "workers", "reload",
)  # fmt: skip
MAX_BYTES = 128 * 1024 * 1024


# Gateways whose API has a handler: their CPU is the gateway's plus its handler workers' (child
# processes), and both parts are also recorded apart.
HANDLER_GATEWAYS = ("gateway-handler",)
HANDLER = Path(__file__).resolve().parent / "bench_handler.py"
# tracing on, every call sampled out / in (its spans exported over OTLP to a sink of this run)
TRACED = {"gateway-traced-out": "always_off", "gateway-traced": "always_on"}
# facade-batched: the same API with server-side batching (at most the calls in flight at saturation)
BATCHING = {"max_batch_size": 16}
# the bottleneck scenario's backend: a device stand-in holding each Predict this long, this many
# at once (at most 400 calls per second, where the hop's CPU leaves the cores room)
DEVICE_TIME = "10ms"
DEVICE_SLOTS = 4


# The same gateway with one feature on, each compared with facade-latest (CPU per call, paired
# by round): what the feature costs a call.
VERSUS = {"facade-latest-metrics": "facade-latest", "facade-latest-logged": "facade-latest"}


def backend_of(process: str) -> str:
    """The backend behind a process: gateways following modelsync have their own."""
    if process.startswith("gateway") and not process.startswith("gateway-static"):
        return "backend-sync"
    return "backend"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few calls, one round")
    parser.add_argument("--calls", type=int, help="measured calls per target and round at c=1")
    parser.add_argument("--sat-calls", type=int, help="measured calls per round at saturation")
    parser.add_argument("--concurrency", type=int, help="calls in flight at saturation")
    parser.add_argument("--rounds", type=int, help="rounds of the small scenario (median)")
    parser.add_argument(
        "--latency-calls", type=int, help="calls per target in the latency scenario (2000)"
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    parser.add_argument("--targets", default="", help="small/large targets (default: all)")
    parser.add_argument("--large-mb", type=int, help="size of the large tensor (default 40)")
    parser.add_argument("--load", choices=("auto", "python", "h2load"), default="auto")
    parser.add_argument("--processes", type=int, help="load processes / connections")
    parser.add_argument("--models", type=Path, default=ROOT / ".modelmux" / "source")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--profile", action="store_true", help="py-spy profiles (small)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else Settings()
    overrides = {
        "calls": args.calls,
        "sat_calls": args.sat_calls,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "latency_calls": args.latency_calls,
        "large_mb": args.large_mb,
        "processes": args.processes,
    }
    changed = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, load=args.load, **changed)


class Bench:
    """One run: the stack, the load generator, the scenarios and their results."""

    def __init__(self, settings: Settings, args: argparse.Namespace, workdir: Path) -> None:
        self.settings = settings
        self.models: Path = args.models
        self.scenarios = [s for s in args.scenarios.split(",") if s]
        unknown = set(self.scenarios) - set(SCENARIOS)
        if unknown:
            raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
        wanted = {t for t in args.targets.split(",") if t}
        self.targets = [t for t in TARGETS if not wanted or t.name in wanted]
        self.profile = args.profile
        self.out: Path = args.out
        self.workdir = workdir
        self.stack = Stack(workdir)
        self.load: PythonLoad | H2Load = self._load_generator()
        self.procs: dict[str, Child] = {}
        self.source = Path()
        self.results: dict[str, Any] = {"notes": []}

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.results["notes"].append(text)

    def _load_generator(self) -> PythonLoad | H2Load:
        s = self.settings
        h2 = None if s.load == "python" else H2Load.find(self.workdir, s.processes)
        if h2 is None and s.load == "h2load":
            raise SystemExit(
                "--load h2load: h2load is not on PATH (apt-get install nghttp2-client)"
            )
        return h2 if h2 is not None else PythonLoad(s.processes)

    def probe(self) -> dict[str, float]:
        """CPU seconds per process of the stack, each with its child processes; for a gateway
        with handler workers also ``<name>:gateway`` (its own process) and ``<name>:workers``."""
        out = {}
        for name, child in self.procs.items():
            out[name] = child.cpu()
            if name in HANDLER_GATEWAYS:
                out[f"{name}:gateway"] = child.cpu_own()
                out[f"{name}:workers"] = out[name] - out[f"{name}:gateway"]
        return out

    # ---- set-up ----------------------------------------------------------------------------

    def setup(self) -> None:
        if not (self.models / "half_plus_two" / "2").is_dir():
            raise SystemExit(f"no example models in {self.models}: run make models first")
        wanted = {t.process for t in self.targets}
        direct = model_config_file(
            self.workdir / "backend.conf", source=self.models / "half_plus_two", versions=(1, 2)
        )
        self.procs.update(self.stack.backends({"backend": direct, "backend-sync": None}))
        self.source = bench_lifecycle.copy_versions(
            self.models, self.workdir / "source" / "half_plus_two", (1, 2)
        )
        sync = self.stack.modelsync(
            modelsync_config(
                self.workdir / "modelsync.yaml",
                source=self.source,
                target=self.workdir / "volume",
                settle="2s",
                debounce="500ms",
            )
        )
        self.procs["modelsync"] = sync
        self._gateways(wanted)
        backend = self.procs["backend"]
        self.procs["barehop"] = self.stack.barehop(backend=backend.address, max_bytes=MAX_BYTES)
        if "barehop-uvloop" in wanted:
            self.procs["barehop-uvloop"] = self.stack.barehop(
                backend=backend.address, max_bytes=MAX_BYTES, loop="uvloop"
            )
        nginx = self.stack.nginx(backend=backend.address, max_bytes=MAX_BYTES)
        if nginx is None:
            self.note("nginx is not on PATH: the nginx targets are skipped")
        else:
            self.procs["nginx"] = nginx
        self.targets = [t for t in self.targets if t.process in self.procs]
        if (
            bench_lifecycle.first_answer(backend.address, version=2, timeout=120, latest=False)
            is None
        ):
            raise RuntimeError(f"the direct backend did not answer version 2:\n{backend.tail()}")
        print(f"load generator: {self.load.name}", flush=True)

    def _gateways(self, wanted: set[str]) -> None:
        """The modelsync-following gateway (first: its start includes loading the models), the
        same with request logging on, one reading local folders with its own backend, and one
        following modelsync whose API has the bench handler (the only one with a handler, so the
        other gateways' start and memory figures stay comparable with runs before it had one)."""
        gw = self.stack.gateway("gateway", self.config("gateway"))
        self.procs["gateway"] = gw
        self.results["gateway_first_start"] = {
            "listening_s": gw.listening,
            "serving_s": gw.ready,
            "note": "includes the backend loading both versions of half_plus_two",
        }
        self.results["gateway_idle"] = {
            "rss_mib": gw.rss(),
            "backend_rss_mib": self.procs["backend-sync"].rss(),
            "modelsync_rss_mib": self.procs["modelsync"].rss(),
        }
        if "gateway-logged" in wanted:
            self.procs["gateway-logged"] = self.stack.gateway(
                "gateway-logged", self.config("gateway-logged", log_requests=True)
            )
        if "gateway-metrics" in wanted:  # Prometheus metrics on, nobody scraping
            self.procs["gateway-metrics"] = self.stack.gateway(
                "gateway-metrics", self.config("gateway-metrics", metrics_listen="127.0.0.1:0")
            )
        if "gateway-static" in wanted:
            static = self.stack.gateway("gateway-static", self.config("gateway-static"))
            self.procs["gateway-static"] = static
            self.results["gateway_idle"]["static_rss_mib"] = static.rss()
        if "gateway-batched" in wanted:
            self.procs["gateway-batched"] = self.stack.gateway(
                "gateway-batched", self.config("gateway-batched", batching=BATCHING)
            )
        for name in (n for n in TRACED if n in wanted):
            env = {
                "OTEL_TRACES_SAMPLER": TRACED[name],
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.stack.otlp_sink(),
            }
            self.procs[name] = self.stack.gateway(name, self.config(name, tracing=True), env=env)
        if "gateway-handler" in wanted:
            handler = self.stack.gateway(
                "gateway-handler", self.config("gateway-handler", handler=HANDLER)
            )
            self.procs["gateway-handler"] = handler
            own = handler.rss_own()
            self.results["gateway_idle"]["handler_gateway_rss_mib"] = own
            self.results["gateway_idle"]["handler_workers_rss_mib"] = handler.rss() - own
            self.results["gateway_idle"]["handler_workers"] = len(handler.pids()) - 1

    def config(
        self,
        name: str,
        *,
        log_requests: bool = False,
        handler: Path | None = None,
        batching: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Path:
        """A gateway config: following modelsync, or reading local folders (``-static`` names).

        The two kinds need a backend each: each gateway sends its backends their complete model
        config, and the servables differ (``half_plus_two`` with both versions when read from
        local folders, one ``half_plus_two@r<revision>`` per version when following modelsync).
        The direct, bare-hop and nginx targets use the local-folder backend, which knows the
        model by its own name.
        """
        static = name.startswith("gateway-static")
        if not static:
            extra.setdefault("modelsync", self.procs["modelsync"].address)
        return gateway_config(
            self.workdir / f"{name}.yaml",
            backend=self.procs[backend_of(name)].address,
            source=self.models / "half_plus_two" if static else self.source,
            max_bytes=MAX_BYTES,
            log_requests=log_requests,
            handler=handler,
            batching=batching,
            extra=extra,
        )

    def address(self, target: Target) -> str:
        return self.procs[target.process].address

    def check_targets(self) -> None:
        """One real gRPC call per target, its answer checked (h2load cannot see grpc-status)."""
        x = req.SMALL
        for target in self.targets:
            with grpc.insecure_channel(self.address(target)) as channel:
                call = channel.unary_unary(req.METHODS[target.kind])
                raw = call(req.build(target.kind, x, target.version), timeout=30)
            req.check(target.kind, raw, x, target.version or req.LATEST)

    # ---- small Predict ---------------------------------------------------------------------

    def _run(
        self,
        target: Target,
        payload: bytes,
        *,
        calls: int,
        concurrency: int,
        connections: int | None = None,
    ) -> Sample:
        sample = self.load.run(
            address=self.address(target),
            method=req.METHODS[target.kind],
            payload=payload,
            calls=calls,
            concurrency=concurrency,
            warmup=self.settings.warmup,
            probe=self.probe,
            connections=connections,
        )
        if sample.errors:
            raise RuntimeError(f"{target.name}: {sample.errors} failed calls: {sample.first_error}")
        return sample

    def small_round(self, target: Target) -> dict[str, float]:
        s = self.settings
        payload = req.build(target.kind, req.SMALL, target.version)
        one = self._run(target, payload, calls=s.calls, concurrency=1)
        sat = self._run(target, payload, calls=s.sat_calls, concurrency=s.concurrency)
        hop = target.process if target.process != "backend" else ""
        backend = backend_of(target.process)
        split = {}
        if hop in HANDLER_GATEWAYS:  # hop_cpu_us* is gateway + workers; the parts apart
            for part in ("gateway", "workers"):
                split[f"{part}_cpu_us_c1"] = one.cpu_us_per_call(f"{hop}:{part}")
                split[f"{part}_cpu_us"] = sat.cpu_us_per_call(f"{hop}:{part}")
        return {
            "p50_us": one.percentile(50),
            "p90_us": one.percentile(90),
            "p99_us": one.percentile(99),
            "rps_c1": one.throughput,
            "hop_cpu_us_c1": one.cpu_us_per_call(hop) if hop else math.nan,
            "backend_cpu_us_c1": one.cpu_us_per_call(backend),
            "rps": sat.throughput,
            "sat_p50_us": sat.percentile(50),
            "sat_p99_us": sat.percentile(99),
            "hop_cpu_us": sat.cpu_us_per_call(hop) if hop else math.nan,
            "backend_cpu_us": sat.cpu_us_per_call(backend),
            **split,
        }

    def small(self) -> None:
        s = self.settings
        rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in self.targets}
        for r in range(s.rounds):
            shift = r % len(self.targets)
            order = self.targets[shift:] + self.targets[:shift]  # no target always goes first
            for target in order:
                rounds[target.name].append(self.small_round(target))
            print(f"small: round {r + 1}/{s.rounds} done", flush=True)
        summary = {}
        for target in self.targets:
            keys = rounds[target.name][0].keys()
            rows = rounds[target.name]
            figures = {k: median([row[k] for row in rows]) for k in keys}
            spread = {k: [min(row[k] for row in rows), max(row[k] for row in rows)] for k in keys}
            summary[target.name] = {**figures, "min_max": spread, "rounds": rows}
        bench_report.add_ratios(summary, {t.name: (t.base, t.floor) for t in self.targets})
        bench_report.add_versus(summary, VERSUS)
        handler = bench_report.handler_summary(summary, "invoke", "own-json")
        if handler:
            self.results["handler"] = handler
        traced = bench_report.cpu_against(
            summary, "facade-latest", ("facade-traced-out", "facade-traced")
        )
        if traced:
            self.results["tracing"] = traced
        gw = self.procs["gateway"]
        self.results["gateway_after_small"] = {"rss_mib": gw.rss(), "peak_rss_mib": gw.rss("VmHWM")}
        self.results["small"] = {
            "calls_c1": s.calls,
            "calls_saturation": s.sat_calls,
            "concurrency": s.concurrency,
            "rounds": s.rounds,
            "targets": summary,
        }

    # ---- latency, interleaved ----------------------------------------------------------------

    def latency(self) -> None:
        """Concurrency 1 with every target interleaved call by call (in a fresh random order on
        each pass), from one sync client in this process: each target's calls meet the same
        machine, so whatever else runs here slows them all alike, unlike the small scenario,
        whose targets take turns in blocks of calls."""
        s = self.settings
        shuffle = random.Random(7).shuffle
        latencies: dict[str, list[float]] = {t.name: [] for t in self.targets}
        with contextlib.ExitStack() as stack:
            calls = {}
            for t in self.targets:
                channel = stack.enter_context(grpc.insecure_channel(self.address(t)))
                payload = req.build(t.kind, req.SMALL, t.version)
                calls[t.name] = (channel.unary_unary(req.METHODS[t.kind]), payload)
            for _ in range(s.warmup):
                for call, payload in calls.values():
                    call(payload, timeout=30)
            order = list(calls)
            for _ in range(s.latency_calls):
                shuffle(order)
                for name in order:
                    call, payload = calls[name]
                    started = time.perf_counter_ns()
                    call(payload, timeout=30)
                    latencies[name].append((time.perf_counter_ns() - started) / 1000)
        summary: dict[str, dict[str, Any]] = {}
        for t in self.targets:
            sample = Sample(len(latencies[t.name]), 0, math.nan, sorted(latencies[t.name]))
            summary[t.name] = {f"p{q}_us": sample.percentile(q) for q in (50, 90, 99)}
        bench_report.add_latency_ratios(summary, {t.name: (t.base, t.floor) for t in self.targets})
        self.results["latency"] = {"calls": s.latency_calls, "targets": summary}

    # ---- large Predict ---------------------------------------------------------------------

    def large(self) -> None:
        s = self.settings
        count = s.large_mb * 1024 * 1024 // 4
        x = req.values(count)
        targets = [t for t in self.targets if t.name in LARGE_TARGETS]
        times: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu: dict[str, list[float]] = {t.name: [] for t in targets}
        with contextlib.ExitStack() as stack:
            calls = {}
            for t in targets:
                channel = stack.enter_context(
                    grpc.insecure_channel(self.address(t), options=_big_options())
                )
                calls[t.name] = (channel.unary_unary(req.METHODS[t.kind]), t)
            payloads = {t.name: req.build(t.kind, x, t.version) for t in targets}
            for i in range(s.large_calls + 1):  # the first pass warms up and checks answers
                for name, (call, t) in calls.items():
                    before = self.procs[t.process].cpu()
                    started = time.perf_counter()
                    raw = call(payloads[name], timeout=120)
                    elapsed = time.perf_counter() - started
                    used = self.procs[t.process].cpu() - before
                    if i == 0:
                        req.check(t.kind, raw, x, t.version or req.LATEST)
                        continue
                    times[name].append(elapsed)
                    cpu[name].append(used)
                    del raw
        self.results["large"] = bench_report.large_summary(
            targets={t.name: (t.base, t.process) for t in targets},
            times=times,
            cpu=cpu,
            megabytes=s.large_mb,
        )
        gw = self.procs["gateway"]
        self.results["gateway_after_large"] = {"rss_mib": gw.rss(), "peak_rss_mib": gw.rss("VmHWM")}

    # ---- throughput with the backend as the bottleneck ---------------------------------------

    def bottleneck(self) -> None:
        """Saturation throughput, direct and through the gateway, from a backend whose Predict also
        holds one of DEVICE_SLOTS device slots for DEVICE_TIME (an accelerator's service time,
        without CPU): the backend, not the two shared cores, bounds the calls per second."""
        conf = model_config_file(
            self.workdir / "backend-device.conf",
            source=self.models / "half_plus_two",
            versions=(1, 2),
        )
        device = ["--device-time", DEVICE_TIME, "--device-slots", str(DEVICE_SLOTS)]
        self.procs.update(self.stack.backends({"backend-device": conf}, extra_args=device))
        backend = self.procs["backend-device"]
        config = gateway_config(
            self.workdir / "gateway-device.yaml",
            backend=backend.address,
            source=self.models / "half_plus_two",
            max_bytes=MAX_BYTES,
            log_requests=False,
        )
        self.procs["gateway-device"] = self.stack.gateway("gateway-device", config)
        targets = [
            Target("direct", "backend-device", "tf", None, "direct"),
            Target("facade", "gateway-device", "tf", None, "direct"),
        ]
        payload = req.build("tf", req.SMALL, None)
        s = self.settings
        rps: dict[str, list[float]] = {t.name: [] for t in targets}
        for r in range(s.bottleneck_rounds):
            for target in targets if r % 2 == 0 else targets[::-1]:
                sample = self._run(target, payload, calls=s.sat_calls, concurrency=s.concurrency)
                rps[target.name].append(sample.throughput)
        paired = [f / d for f, d in zip(rps["facade"], rps["direct"], strict=True)]
        direct, facade, ratio = median(rps["direct"]), median(rps["facade"]), median(paired)
        self.results["bottleneck"] = {
            "device_time": DEVICE_TIME,
            "device_slots": DEVICE_SLOTS,
            "rounds": rps,
            "direct_rps": direct,
            "facade_rps": facade,
            "rps_x_direct": ratio,
            "summary": f"backend with a {DEVICE_TIME} x {DEVICE_SLOTS}-slot device stand-in:"
            f" {direct:.0f} rps direct, {facade:.0f} through the gateway (facade, latest), median"
            f" of per-round ratios {ratio:.2f}",
        }

    # ---- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.results["meta"] = bench_report.machine(self.load.name)
        self.results["meta"]["settings"] = asdict(self.settings)
        self.results["meta"]["scenarios"] = self.scenarios
        self.results["meta"]["loadavg_start"] = os.getloadavg()
        self.setup()
        self.check_targets()
        if "small" in self.scenarios:
            self.small()
        if "metrics" in self.scenarios:  # in-process: the request path with metrics off and on
            facade = self.results.get("small", {}).get("targets", {}).get("facade-latest", {})
            self.results["metrics"] = bench_metrics.request_path(
                rounds=self.settings.metrics_rounds,
                calls=self.settings.metrics_calls,
                hop_cpu_us=facade.get("hop_cpu_us", 0.0),
            )
        if "latency" in self.scenarios:
            self.latency()
        if self.profile:
            self.results["profile"] = bench_lifecycle.profile(self)
        if "large" in self.scenarios:
            self.large()
        if "bottleneck" in self.scenarios:
            self.bottleneck()
        lifecycle = bench_lifecycle.Lifecycle(self)
        for name in ("memory", "start", "workers", "reload"):
            if name in self.scenarios:
                self.results[name] = getattr(lifecycle, name)()
        self.results["targets_check"] = bench_report.issue_targets(self.results)
        self.results["meta"]["duration_s"] = round(time.time() - started, 1)
        self.results["meta"]["loadavg_end"] = os.getloadavg()
        return self.results

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.load.close()
        self.stack.close()


def _big_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ]


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    signal.signal(signal.SIGTERM, _sigterm)
    with tempfile.TemporaryDirectory(prefix="modelmux-bench-") as tmp:
        bench = Bench(settings, args, Path(tmp))
        try:
            results = bench.run()
        except KeyboardInterrupt:
            print("interrupted: stopping every child process", file=sys.stderr)
            return 130
        finally:
            bench.close()
    results["meta"]["command"] = " ".join(["scripts/bench.py", *(argv or sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(bench_report.clean(results), indent=2, default=str) + "\n")
    print(bench_report.table(results))
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

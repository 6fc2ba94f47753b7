"""Load generators: h2load when it is installed, else N Python processes with their own channels.

Both send one pre-serialized request body over and over, a fixed number of times, and time every
call. Each run is warmed up first (connections open, the target's code paths hot), then the
caller's ``probe`` (CPU seconds per process of the stack) is read just before the measured calls
start and just after the last one ends, so the CPU delta covers the measured calls only.

Python generator: ``processes`` worker processes (spawned once, reused), each with its own channel
per run. At concurrency 1 one worker makes sequential calls with a sync stub; above that, the
concurrency is split over the workers, each keeping its share of calls in flight with grpc.aio.
Latency is ``time.perf_counter_ns`` around each call (CLOCK_MONOTONIC, comparable across
processes).

h2load speaks gRPC given a body file holding the 5-byte gRPC frame header plus the message and the
headers ``content-type: application/grpc`` and ``te: trailers``. It sees HTTP status codes only,
not ``grpc-status`` in the trailers, so every target is checked with a real gRPC call before it
is measured. Latencies come from its ``--log-file`` (one line per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import queue
import shutil
import statistics
import subprocess
import time
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

Probe = Callable[[], dict[str, float]]
CALL_TIMEOUT = 60.0
JOB_TIMEOUT = 600.0
MAX_BYTES = 256 * 1024 * 1024


@dataclass
class Sample:
    """One measured run: calls, failures, wall time, sorted latencies, CPU used per process."""

    calls: int
    errors: int
    wall: float
    latencies_us: list[float]
    cpu: dict[str, float] = field(default_factory=dict)
    first_error: str = ""

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in microseconds."""
        if not self.latencies_us:
            return math.nan
        rank = max(1, math.ceil(q / 100 * len(self.latencies_us)))
        return self.latencies_us[rank - 1]

    @property
    def throughput(self) -> float:
        return self.calls / self.wall if self.wall > 0 else math.nan

    def cpu_us_per_call(self, process: str) -> float:
        if process not in self.cpu or not self.calls:
            return math.nan
        return self.cpu[process] / self.calls * 1e6


@dataclass(frozen=True)
class Job:
    address: str
    method: str
    payload: bytes
    calls: int
    inflight: int
    warmup: int


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as integers allow."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_BYTES),
        ("grpc.max_send_message_length", MAX_BYTES),
    ]


# ---- Python worker processes ---------------------------------------------------------------------


def _sync_run(job: Job, inbox: Any, outbox: Any) -> dict[str, Any] | None:
    with grpc.insecure_channel(job.address, options=_options()) as channel:
        call = channel.unary_unary(job.method)
        for _ in range(job.warmup):
            call(job.payload, timeout=CALL_TIMEOUT)
        outbox.put(("ready", None))
        if inbox.get() != "go":
            return None
        latencies = array("q")
        errors, first = 0, ""
        started = time.perf_counter_ns()
        for _ in range(job.calls):
            t0 = time.perf_counter_ns()
            try:
                call(job.payload, timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                errors += 1
                first = first or f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            latencies.append(time.perf_counter_ns() - t0)
        ended = time.perf_counter_ns()
    return {"start": started, "end": ended, "lat": latencies, "errors": errors, "first": first}


async def _aio_run(job: Job, inbox: Any, outbox: Any) -> dict[str, Any] | None:
    async with grpc.aio.insecure_channel(job.address, options=_options()) as channel:
        call = channel.unary_unary(job.method)
        await asyncio.gather(*(call(job.payload, timeout=CALL_TIMEOUT) for _ in range(job.warmup)))
        outbox.put(("ready", None))
        if await asyncio.to_thread(inbox.get) != "go":
            return None
        latencies = array("q")
        state = {"left": job.calls, "errors": 0, "first": ""}

        async def loop() -> None:
            while state["left"] > 0:  # type: ignore[operator]
                state["left"] -= 1  # type: ignore[operator]
                t0 = time.perf_counter_ns()
                try:
                    await call(job.payload, timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    state["errors"] += 1  # type: ignore[operator]
                    state["first"] = state["first"] or f"{exc.code().name}: {exc.details()}"
                latencies.append(time.perf_counter_ns() - t0)

        started = time.perf_counter_ns()
        await asyncio.gather(*(loop() for _ in range(job.inflight)))
        ended = time.perf_counter_ns()
    return {
        "start": started,
        "end": ended,
        "lat": latencies,
        "errors": state["errors"],
        "first": state["first"],
    }


def worker(inbox: Any, outbox: Any) -> None:
    """A load process: runs jobs from ``inbox`` until it gets None (or anything but "go")."""
    while True:
        job = inbox.get()
        if not isinstance(job, Job):
            return
        try:
            if job.inflight == 1:
                result = _sync_run(job, inbox, outbox)
            else:
                result = asyncio.run(_aio_run(job, inbox, outbox))
        except Exception as exc:
            outbox.put(("failed", f"{type(exc).__name__}: {exc}"))
            return
        if result is None:
            return
        outbox.put(("done", result))


class PythonLoad:
    """The multi-process Python generator."""

    name = "python"

    def __init__(self, processes: int) -> None:
        self.processes = max(1, processes)
        self._ctx = mp.get_context("spawn")
        self._outbox: Any = self._ctx.Queue()
        self._workers: list[tuple[Any, Any]] = []

    def _start(self) -> None:
        while len(self._workers) < self.processes:
            inbox = self._ctx.Queue()
            proc = self._ctx.Process(target=worker, args=(inbox, self._outbox), daemon=True)
            proc.start()
            self._workers.append((proc, inbox))

    def _collect(self, count: int, kind: str) -> list[Any]:
        out = []
        deadline = time.monotonic() + JOB_TIMEOUT
        while len(out) < count:
            try:
                tag, value = self._outbox.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"load workers: no {kind} after {JOB_TIMEOUT}s") from None
            if tag == "failed":
                raise RuntimeError(f"load worker failed: {value}")
            out.append(value)
        return out

    def run(
        self,
        *,
        address: str,
        method: str,
        payload: bytes,
        calls: int,
        concurrency: int,
        warmup: int,
        probe: Probe,
        connections: int | None = None,
    ) -> Sample:
        """``connections`` is h2load's; here each process has one channel (one connection)."""
        self._start()
        used = min(self.processes, concurrency, calls)
        shares = zip(split(calls, used), split(concurrency, used), strict=True)
        for (_, inbox), (n, inflight) in zip(self._workers, shares, strict=False):
            inbox.put(Job(address, method, payload, n, inflight, max(1, warmup // used)))
        self._collect(used, "ready")
        before = probe()
        for _, inbox in self._workers[:used]:
            inbox.put("go")
        results = self._collect(used, "result")
        after = probe()
        latencies = sorted(v / 1000 for r in results for v in r["lat"])
        wall = (max(r["end"] for r in results) - min(r["start"] for r in results)) / 1e9
        return Sample(
            calls=calls,
            errors=sum(r["errors"] for r in results),
            wall=wall,
            latencies_us=latencies,
            cpu={k: after[k] - before.get(k, 0.0) for k in after},
            first_error=next((r["first"] for r in results if r["first"]), ""),
        )

    def close(self) -> None:
        for _, inbox in self._workers:
            with contextlib.suppress(Exception):
                inbox.put(None)
        for proc, _ in self._workers:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._workers.clear()


# ---- h2load --------------------------------------------------------------------------------------


class H2Load:
    """h2load (nghttp2-client) driving gRPC over h2c with a pre-serialized body."""

    name = "h2load"

    def __init__(self, binary: str, workdir: Path, connections: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.connections = max(1, connections)

    @classmethod
    def find(cls, workdir: Path, connections: int) -> H2Load | None:
        binary = shutil.which("h2load")
        return cls(binary, workdir, connections) if binary else None

    def _body(self, payload: bytes) -> Path:
        path = self.workdir / f"body-{zlib.crc32(payload):08x}-{len(payload)}.grpc"
        if not path.exists():
            path.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
        return path

    def _h2load(
        self, url: str, body: Path, calls: int, concurrency: int, log: Path, connections: int
    ) -> str:
        conns = min(connections, concurrency, calls)
        streams = math.ceil(concurrency / conns)
        argv = [
            self.binary,
            *("-n", str(calls), "-c", str(conns), "-m", str(streams), "-t", "1"),
            *("-d", str(body), "-T", str(int(CALL_TIMEOUT)), "--log-file", str(log)),
            *("-H", "content-type: application/grpc", "-H", "te: trailers", url),
        ]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    def run(
        self,
        *,
        address: str,
        method: str,
        payload: bytes,
        calls: int,
        concurrency: int,
        warmup: int,
        probe: Probe,
        connections: int | None = None,
    ) -> Sample:
        url = f"http://{address}{method}"
        conns = connections or self.connections
        body = self._body(payload)
        log = self.workdir / "h2load.log"
        if warmup:
            self._h2load(url, body, max(warmup, concurrency), concurrency, log, conns)
        log.unlink(missing_ok=True)  # h2load appends
        before = probe()
        out = self._h2load(url, body, calls, concurrency, log, conns)
        after = probe()
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
        starts = [int(r[0]) for r in rows]
        ends = [int(r[0]) + int(r[2]) for r in rows]
        bad = sum(1 for r in rows if r[1] != "200")
        return Sample(
            calls=len(rows),
            errors=bad + max(0, calls - len(rows)),
            wall=(max(ends) - min(starts)) / 1e6 if rows else math.nan,
            latencies_us=sorted(float(r[2]) for r in rows),
            cpu={k: after[k] - before.get(k, 0.0) for k in after},
            first_error=_summary_line(out) if bad or len(rows) < calls else "",
        )

    def close(self) -> None:
        pass


def _summary_line(out: str) -> str:
    return next((line.strip() for line in out.splitlines() if line.startswith("requests:")), "")


def median(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan

"""The benchmark scenarios around the request path: memory, start, workers, reload, profiles.

``Lifecycle`` runs on a ``Bench`` whose stack is up (scripts/bench.py): it starts the extra
processes each scenario needs (modelsync, more gateways), stops them afterwards, and returns the
scenario's results. ``profile`` records py-spy profiles of the gateway and the bare hop under
saturation load.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import bench_requests as req
import grpc
from bench_load import H2Load, PythonLoad, Sample, median
from bench_stack import (
    MODELMUX,
    ROOT,
    Child,
    Stack,
    free_port,
    gateway_config,
    modelsync_config,
    wait_port,
)
from bench_targets import TARGETS, Settings, Target


class Bench(Protocol):
    """What the scenarios use of scripts/bench.py's ``Bench`` (which imports this module)."""

    settings: Settings
    stack: Stack
    workdir: Path
    models: Path
    source: Path
    out: Path
    targets: list[Target]
    load: PythonLoad | H2Load
    procs: dict[str, Child]
    results: dict[str, Any]

    def note(self, text: str) -> None: ...

    def config(self, name: str, **extra: Any) -> Path: ...

    def _run(
        self,
        target: Target,
        payload: bytes,
        *,
        calls: int,
        concurrency: int,
        connections: int | None = None,
    ) -> Sample: ...


# The kernel spreads connections, not calls, over gateway workers: h2load opens several.
WORKER_CONNECTIONS = 8


# the S3 reload: dummy credentials for moto, and how often modelsync lists the bucket
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
S3_POLL = "1s"


def copy_versions(models: Path, dest: Path, versions: tuple[int, ...]) -> Path:
    """A fresh local model source holding ``versions`` of half_plus_two."""
    dest.mkdir(parents=True, exist_ok=True)
    for version in versions:
        shutil.copytree(models / "half_plus_two" / str(version), dest / str(version))
    return dest


def publish(source_version: Path, dest: Path, *, extra_mb: int = 0) -> None:
    """Builds a version next to the source folder and renames it in: watchers see it whole."""
    staging = dest.parent.parent / f"staging-{dest.parent.name}-{dest.name}"
    shutil.copytree(source_version, staging)
    if extra_mb:
        with (staging / "assets" / "blob.bin").open("wb") as out:
            for _ in range(extra_mb):
                out.write(os.urandom(1024 * 1024))
    os.rename(staging, dest)


def _published(version: int) -> Any:
    return lambda e: e.get("event") == "published" and e.get("version") == version


class Lifecycle:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.stack = bench.stack
        self.settings = bench.settings
        self.workdir = bench.workdir

    # ---- memory ------------------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        """modelsync's RSS idle (after mirroring two versions) and after mirroring a large one."""
        source = copy_versions(
            self.bench.models, self.workdir / "sync-src" / "half_plus_two", (1, 2)
        )
        config = modelsync_config(
            self.workdir / "modelsync.yaml",
            source=source,
            target=self.workdir / "sync-target",
            settle="200ms",
            debounce="100ms",
        )
        sync = self.stack.modelsync(config, name="modelsync-memory")
        try:
            sync.wait_log(_published(2), timeout=60, what="version 2 published")
            sync.wait_log(_published(1), timeout=60, what="version 1 published")
            time.sleep(1.0)
            idle = sync.rss()
            mb = self.settings.asset_mb
            started = time.monotonic()
            publish(source / "2", source / "3", extra_mb=mb)
            sync.wait_log(_published(3), timeout=120, what="version 3 published")
            mirrored = time.monotonic() - started
            loaded, peak = sync.rss(), sync.rss("VmHWM")
        finally:
            self.stack.discard(sync)
        gateway = {
            key: self.bench.results.get(key)
            for key in ("gateway_idle", "gateway_after_small", "gateway_after_large")
        }
        return {
            "modelsync": {
                "idle_rss_mib": idle,
                "loaded_rss_mib": loaded,
                "peak_rss_mib": peak,
                "asset_mb": mb,
                "mirror_s": mirrored,
            },
            "gateway": gateway,
        }

    # ---- start -------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Fresh gateways against a warm backend: start to serving line and to health SERVING,
        following modelsync and (when the static gateway runs) reading local folders."""
        modes = ["gateway-start"]
        if "gateway-static" in self.bench.procs:
            modes.append("gateway-static-start")
        out: dict[str, Any] = {}
        for mode in modes:
            rows = []
            for i in range(self.settings.start_rounds):
                name = f"{mode}-{i}"
                gateway = self.stack.gateway(name, self.bench.config(name))
                rows.append(
                    {
                        "listening_s": gateway.listening,
                        "serving_s": gateway.ready,
                        "rss_mib": gateway.rss(),
                    }
                )
                self.stack.discard(gateway)
            out["static" if "static" in mode else "modelsync"] = {
                "listening_s": median([r["listening_s"] for r in rows]),
                "serving_s": median([r["serving_s"] for r in rows]),
                "idle_rss_mib": median([r["rss_mib"] for r in rows]),
                "rounds": rows,
            }
        return out

    # ---- workers -----------------------------------------------------------------------------

    def workers(self) -> dict[str, Any]:
        """Saturation throughput through one gateway worker and through two."""
        done = subprocess.run(
            [*MODELMUX, "gateway", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if "--workers" not in done.stdout:
            return {
                "measurable": False,
                "summary": "not yet measurable: `modelmux gateway` has no --workers option here",
            }
        config = self.bench.config("gateway-2w", listen=f"127.0.0.1:{free_port()}")
        two = self.stack.gateway("gateway-2w", config, extra_args=["--workers", "2"])
        self.bench.procs["gateway-2w"] = two
        try:
            _wait_all_serving(two, count=2, timeout=60)
            return self._workers_rounds()
        finally:
            self.bench.procs.pop("gateway-2w")
            self.stack.discard(two)

    def _workers_rounds(self) -> dict[str, Any]:
        one = next(t for t in TARGETS if t.name == "facade-latest")
        two = replace(one, name="facade-latest-2w", process="gateway-2w")
        payload = req.build("tf", req.SMALL, None)
        rps: dict[str, list[float]] = {"1": [], "2": []}
        cpu: dict[str, list[float]] = {"1": [], "2": []}
        for _ in range(self.settings.rounds):
            for label, target in (("1", one), ("2", two)):
                sample = self.bench._run(
                    target,
                    payload,
                    calls=self.settings.sat_calls,
                    concurrency=self.settings.concurrency,
                    connections=WORKER_CONNECTIONS,
                )
                rps[label].append(sample.throughput)
                cpu[label].append(sample.cpu_us_per_call(target.process))
        one_rps, two_rps = median(rps["1"]), median(rps["2"])
        conns = WORKER_CONNECTIONS if self.bench.load.name == "h2load" else self.settings.processes
        return {
            "measurable": True,
            "rps_1_worker": one_rps,
            "rps_2_workers": two_rps,
            "cpu_us_1_worker": median(cpu["1"]),
            "cpu_us_2_workers": median(cpu["2"]),
            "connections": conns,
            "summary": f"{one_rps:.0f} rps with 1 worker, {two_rps:.0f} rps with 2"
            f" ({two_rps / one_rps:.2f}x) over {conns} connections",
        }

    # ---- reload ------------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """A new version copied into modelsync's local source folder, timed to modelsync's
        publish event and to the gateway's first answer from it (Predict for latest)."""
        sync, gateway = self.bench.procs["modelsync"], self.bench.procs["gateway"]
        started = time.monotonic()
        publish(self.bench.source / "2", self.bench.source / "3")
        local = self._propagation(sync, gateway, started, "local folder")
        if not local["measurable"]:
            return local
        s3 = self._reload_s3()
        return {
            **local,
            "s3": s3,
            "summary": f"local folder: modelsync published after"
            f" {local['modelsync_published_s']:.2f} s, first answer from the new version"
            f" {local['first_answer_s']:.2f} s after the copy; {s3['summary']}",
        }

    def _propagation(self, sync: Child, gateway: Child, since: float, what: str) -> dict[str, Any]:
        """From ``since`` (version 3 complete in the source) to modelsync's publish event and to
        the gateway's first answer from version 3."""
        timeout = self.settings.reload_timeout
        sync.wait_log(_published(3), timeout=timeout + 10, what=f"version 3 published ({what})")
        synced = time.monotonic() - since
        answered = first_answer(gateway.address, version=3, timeout=timeout)
        if answered is None:
            return {
                "measurable": False,
                "modelsync_published_s": synced,
                "summary": f"{what}: not yet measurable: modelsync published version 3 after"
                f" {synced:.2f} s, but the gateway still answered latest with version 2"
                f" {timeout:.0f} s later",
            }
        return {
            "measurable": True,
            "modelsync_published_s": synced,
            "first_answer_s": answered - since,
        }

    def _reload_s3(self) -> dict[str, Any]:
        """The same through S3: moto's server on loopback holds the source, a modelsync polling it
        every S3_POLL, a gateway following that modelsync and a backend of their own (a gateway
        sends its backends their complete model config, so it cannot share one)."""
        moto = Path(sys.executable).with_name("moto_server")
        if not moto.exists():
            return {"measurable": False, "summary": "S3: not measured (moto_server not installed)"}
        import boto3  # the harness needs it only here
        from botocore.config import Config

        work = self.bench.workdir / "s3"
        env = {**os.environ, **FAKE_AWS}
        port = free_port()
        self.stack.spawn("moto", [str(moto), "-H", "127.0.0.1", "-p", str(port)], env=env)
        wait_port(f"127.0.0.1:{port}", 30)
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
            aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )
        s3.create_bucket(Bucket="bench")
        model = self.bench.models / "half_plus_two"

        def upload(version: int, as_version: int) -> None:
            for path in sorted((model / str(version)).rglob("*")):
                if path.is_file():
                    rel = path.relative_to(model / str(version)).as_posix()
                    key = f"half_plus_two/{as_version}/{rel}"
                    s3.put_object(Bucket="bench", Key=key, Body=path.read_bytes())

        upload(1, 1)
        upload(2, 2)
        source = "s3://bench/half_plus_two/"
        backend = self.stack.backends({"backend-s3": None})["backend-s3"]
        sync = self.stack.modelsync(
            modelsync_config(
                work.with_suffix(".modelsync.yaml"),
                source=source,
                target=work / "volume",
                settle="0s",
                debounce="500ms",
                extra={"s3_endpoint_url": endpoint, "poll_interval": S3_POLL},
            ),
            name="modelsync-s3",
            env=env,
        )
        gateway = self.stack.gateway(
            "gateway-s3",
            gateway_config(
                work.with_suffix(".gateway.yaml"),
                backend=backend.address,
                source=source,
                max_bytes=64 * 1024 * 1024,
                log_requests=False,
                extra={"modelsync": sync.address},
            ),
        )
        timeout = self.settings.reload_timeout
        if first_answer(gateway.address, version=2, timeout=timeout) is None:
            return {"measurable": False, "summary": "S3: the gateway never answered version 2"}
        began = time.monotonic()
        upload(2, 3)
        uploaded = time.monotonic()
        s3 = self._propagation(sync, gateway, uploaded, "S3")
        if not s3["measurable"]:
            return s3
        return {
            **s3,
            "poll_interval": S3_POLL,
            "upload_s": uploaded - began,
            "summary": f"S3 (polled every {S3_POLL}): modelsync published"
            f" {s3['modelsync_published_s']:.2f} s and the first answer from the new version came"
            f" {s3['first_answer_s']:.2f} s after the upload ended",
        }


def _wait_all_serving(child: Child, *, count: int, timeout: float) -> None:
    """Waits for ``count`` serving lines (one per worker) and for fresh connections, which the
    kernel spreads over the workers, to be answered."""
    deadline = time.monotonic() + timeout
    while sum(1 for e in child.log_lines() if e.get("event") == "serving") < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name}: fewer than {count} workers serving:\n{child.tail()}")
        time.sleep(0.05)
    for _ in range(4 * count):
        if first_answer(child.address, version=2, timeout=deadline - time.monotonic()) is None:
            raise TimeoutError(f"{child.name}: a worker does not answer:\n{child.tail()}")


def first_answer(
    address: str, *, version: int, timeout: float, latest: bool = True
) -> float | None:
    """Polls Predict (for latest, or for ``version``) until ``version`` answers; the monotonic
    time it did, or None after ``timeout`` seconds."""
    payload = req.build("tf", req.SMALL, None if latest else version)
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(req.METHODS["tf"])
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                ran, _ = req.answer("tf", call(payload, timeout=5))
                if ran == version:
                    return time.monotonic()
            time.sleep(0.02)
    return None


# ---- profiles ------------------------------------------------------------------------------------

PROFILED = ("facade-latest", "own-typed", "barehop-latest")


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of ``pid``."""
    out: dict[str, float] = collections.defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            out[comm] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return dict(out)


def _frame(text: str) -> str:
    """``fn (/long/path/site-packages/pkg/mod.py:12)`` -> ``fn (pkg/mod.py)``."""
    name, _, where = text.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif path.startswith(str(ROOT)):
        path = os.path.relpath(path, ROOT)
    elif "/lib/python" in path:
        path = "stdlib/" + path.rsplit("/", 1)[-1]
    return f"{name} ({path})" if path else name


AREAS = (
    ("gateway/", "gateway code"),
    ("modelmux_common/", "gateway code"),
    ("bench_barehop.py", "bare hop code"),
    ("structlog/", "structlog"),
    ("google/protobuf/", "protobuf"),
    ("grpc/", "grpc python layer"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
)


def _callback(frames: list[str]) -> list[str]:
    """The part of a stack below the event loop's dispatch (the handler code that ran), or the
    poller thread's frames."""
    for marker in ("Handle._run (", "Thread.run ("):
        for i, frame in enumerate(frames):
            if frame.startswith(marker):
                return frames[i:]
    return frames[-1:]


def _area(frames: list[str]) -> str:
    """What a sample was doing: the project code in the callback (with whatever it called), else
    the package of the innermost frame; ``Handle._run`` / ``Thread.run`` with nothing below them
    is grpc's Cython and C code (py-spy does not see into it)."""
    below = _callback(frames)
    for frame in below:
        for marker, area in AREAS[:3]:
            if marker in frame:
                return area
    leaf = below[-1]
    if leaf.startswith("Handle._run "):
        return "grpc Cython/C run from asyncio callbacks"
    if leaf.startswith("Thread.run "):
        return "grpc Cython/C poller thread"
    return next((area for marker, area in AREAS if marker in leaf), "other")


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Shares of samples: by area, by function (self), and project functions (inclusive)."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")]
        n = int(count)
        samples += n
        own[frames[-1]] += n
        areas[_area(frames)] += n
        for frame in set(frames):
            if any(m in frame for m, _ in AREAS[:3]) and not frame.startswith(
                ("main ", "<module>")
            ):
                total[frame] += n

    def share(n: int) -> float:
        return round(100 * n / samples, 1) if samples else 0.0

    return {
        "samples": samples,
        "areas_pct": {a: share(n) for a, n in areas.most_common()},
        "self_pct": [(f, share(n)) for f, n in own.most_common(top)],
        "project_total_pct": [(f, share(n)) for f, n in total.most_common(top)],
    }


def profile(bench: Bench) -> dict[str, Any]:
    """py-spy (on PATH or beside the interpreter) on the gateway and the bare hop under load."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        bench.note("py-spy is not installed: no profiles (pip install py-spy)")
        return {"skipped": "py-spy not installed"}
    out: dict[str, Any] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bench.out.mkdir(parents=True, exist_ok=True)
    for target in [t for t in bench.targets if t.name in PROFILED]:
        proc = bench.procs[target.process]
        raw = bench.out / f"profile-{stamp}-{target.name}.txt"
        spy = subprocess.Popen(
            [
                *(binary, "record", "--pid", str(proc.pid), "--rate", "250", "--nonblocking"),
                *("--format", "raw", "--output", str(raw)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # attached
            before = _thread_cpu(proc.pid)
            payload = req.build(target.kind, req.SMALL, target.version)
            sample = bench._run(
                target,
                payload,
                calls=3 * bench.settings.sat_calls,
                concurrency=bench.settings.concurrency,
            )
            after = _thread_cpu(proc.pid)
        finally:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        threads = {k: (after[k] - before.get(k, 0.0)) / sample.calls * 1e6 for k in after}
        out[target.name] = {
            "file": raw.name,
            "cpu_us_per_call": sample.cpu_us_per_call(target.process),
            "thread_cpu_us_per_call": {k: round(v, 1) for k, v in threads.items() if v > 0},
            **(summarize(raw) if raw.exists() else {"error": "py-spy wrote nothing"}),
        }
    return out

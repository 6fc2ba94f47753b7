"""Measures modelsync's latency: from a new version landing in S3 to its publish event.

Starts moto's S3 server on loopback and ``modelmux sync`` as a real process (default poll interval
unless --poll-interval is given), subscribes to WatchEvents over gRPC, then uploads new versions and
times each from the end of its upload to the VERSION_ADDED event on the stream. Uploads start at a
random phase of the poll cycle, so the figures spread over roughly [settle, poll interval] plus
the transfer. The daemon's own ``published`` log line gives the fetch+publish part of that time.

    .venv/bin/python scripts/measure_sync.py                # small x5, 200 MB x2
    .venv/bin/python scripts/measure_sync.py --large-mb 50 --small-runs 2 --large-runs 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import grpc
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from modelmux.modelsync.v1 import modelsync_pb2 as pb
from modelmux.modelsync.v1 import modelsync_pb2_grpc as pb_grpc
from modelmux_common.config import ModelsyncConfig, parse_duration

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "measure-models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class Daemon:
    """``modelmux sync`` with its JSON log collected."""

    def __init__(self, config: Path) -> None:
        self.lines: list[dict[str, Any]] = []
        self.popen = subprocess.Popen(
            [str(BIN / "modelmux"), "sync", "--config", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **AWS, "MODELMUX_LOG_FORMAT": "json"},
            cwd=ROOT,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))

    def find(self, event: str, **fields: Any) -> dict[str, Any] | None:
        for line in list(self.lines):
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                return line
        return None

    def address(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.find("serving")
            if line:
                return str(line["address"])
            time.sleep(0.05)
        raise TimeoutError("modelsync did not start")

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(30)


class Watcher:
    """Records the arrival time of every VERSION_ADDED event on a WatchEvents stream."""

    def __init__(self, address: str) -> None:
        self.arrivals: dict[tuple[str, int], float] = {}
        self._channel = grpc.insecure_channel(address)
        stub = pb_grpc.ModelSyncStub(self._channel)
        self._call = stub.WatchEvents(pb.WatchEventsRequest(from_revision=0))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self._call:
                if item.WhichOneof("item") == "event":
                    e = item.event
                    if e.kind == pb.EVENT_KIND_VERSION_ADDED:
                        self.arrivals[(e.model, e.version)] = time.monotonic()
        except grpc.RpcError:
            pass

    def wait(self, model: str, version: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (model, version) in self.arrivals:
                return self.arrivals[(model, version)]
            time.sleep(0.005)
        raise TimeoutError(f"no VERSION_ADDED for {model}/{version}")

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


def upload(s3: Any, prefix: str, weights: bytes | Path) -> None:
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}saved_model.pb", Body=b"graph" * 100)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}variables/variables.index", Body=b"index")
    key = f"{prefix}variables/variables.data-00000-of-00001"
    if isinstance(weights, Path):  # large: a multipart upload, as the AWS CLI would do it
        s3.upload_file(
            str(weights), BUCKET, key, Config=TransferConfig(multipart_chunksize=64 << 20)
        )
    else:
        s3.put_object(Bucket=BUCKET, Key=key, Body=weights)


def measure(
    s3: Any, watcher: Watcher, daemon: Daemon, version: int, weights: bytes | Path, poll: float
) -> dict[str, float]:
    prefix = f"m/{version}/"
    # Land at a random phase of the poll cycle, as a real upload would (not right after a tick).
    time.sleep(random.uniform(0, poll))
    began = time.monotonic()
    upload(s3, prefix, weights)
    landed = time.monotonic()
    arrived = watcher.wait("m", version, timeout=poll * 3 + 600)
    published = None
    while published is None:
        published = daemon.find("published", model="m", version=version)
        time.sleep(0.01)
    return {
        "upload_s": round(landed - began, 3),
        "landed_to_event_s": round(arrived - landed, 3),
        "fetch_and_publish_s": float(published["seconds"]),
    }


def summary(name: str, runs: list[dict[str, float]]) -> dict[str, Any]:
    lat = [r["landed_to_event_s"] for r in runs]
    fetch = [r["fetch_and_publish_s"] for r in runs]
    return {
        "case": name,
        "runs": len(runs),
        "landed_to_event_s": {"min": min(lat), "median": statistics.median(lat), "max": max(lat)},
        "fetch_and_publish_s": {"median": statistics.median(fetch)},
        "each": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--poll-interval", help="override modelsync.poll_interval (default: 10s)")
    parser.add_argument("--small-runs", type=int, default=5)
    parser.add_argument("--large-runs", type=int, default=2)
    parser.add_argument("--large-mb", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="measure-sync-"))
    port = free_port()
    moto_log = open(work / "moto.log", "wb")  # noqa: SIM115 (lives as long as the server)
    moto = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=moto_log,
        stderr=moto_log,
    )
    daemon: Daemon | None = None
    watcher: Watcher | None = None
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            config=BotoConfig(s3={"addressing_style": "path"}),
            aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket=BUCKET)
        section: dict[str, Any] = {
            "target": str(work / "target"),
            "listen": "127.0.0.1:0",
            "s3_endpoint_url": endpoint,
        }
        if args.poll_interval:
            section["poll_interval"] = args.poll_interval
        apis = [
            {
                "name": "m",
                "handler": {"type": "tensorflow", "models": {"path": f"s3://{BUCKET}/m/"}},
            }
        ]
        config = work / "modelmux.yaml"
        config.write_text(yaml.safe_dump({"modelsync": section, "apis": apis}))
        daemon = Daemon(config)
        watcher = Watcher(daemon.address())
        poll = (
            parse_duration(args.poll_interval)
            if args.poll_interval
            else ModelsyncConfig().poll_interval
        )
        print(f"poll interval {poll:g} s; moto at {endpoint}; target {work / 'target'}", flush=True)

        small: list[dict[str, float]] = []
        version = 1
        for _ in range(args.small_runs):
            small.append(measure(s3, watcher, daemon, version, os.urandom(4096), poll))
            print(f"small v{version}: {small[-1]}", flush=True)
            version += 1
        big_file = work / "weights.bin"
        with open(big_file, "wb") as fh:
            for _ in range(args.large_mb):
                fh.write(os.urandom(1 << 20))
        large: list[dict[str, float]] = []
        for _ in range(args.large_runs):
            large.append(measure(s3, watcher, daemon, version, big_file, poll))
            print(f"{args.large_mb} MB v{version}: {large[-1]}", flush=True)
            version += 1
        result = [summary("small (~5 KB)", small), summary(f"large ({args.large_mb} MB)", large)]
        print(json.dumps(result, indent=2))
    finally:
        if watcher is not None:
            watcher.close()
        if daemon is not None:
            daemon.stop()
        moto.terminate()
        moto.wait(30)
        moto_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

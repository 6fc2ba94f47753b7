"""Measures what docs/operations.md promises for the quickstart: a version dropped into the local source
folder (``cp -r``) is served, and a version rewritten in place serves its new content, about a
second later.

By default it runs the quickstart stack itself (``modelmux up`` over a copy of
examples/quickstart/modelmux.yaml with free loopback ports, a temporary copy of the example models
and a temporary volume; nothing under .modelmux/ is touched). ``--gateway`` and ``--source``
measure a stack that is already running instead (e.g. ``make run``; the version folder it adds
is removed at the end). Each round times, from the moment the copy returned until a Predict for
the latest version of ``half_plus_two`` answers from it:

* add: ``cp -r half_plus_two/2 half_plus_two/N`` (a new latest version, y = 0.5x + 3);
* rewrite: the files of version 1 (y = 0.5x + 2) copied over version N in place.

    .venv/bin/python scripts/measure_local_reload.py --rounds 5
    .venv/bin/python scripts/measure_local_reload.py --settle 2s   # the quickstart before issue 18
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

from modelmux.v1 import inference_pb2, inference_pb2_grpc, tensor_pb2

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart" / "modelmux.yaml"
SOURCE = ROOT / ".modelmux" / "source"
X = [1.0, 2.0, 5.0]
ADDED = [3.5, 4.0, 5.5]  # version 2's content: 0.5x + 3
REWRITTEN = [2.5, 3.0, 4.5]  # version 1's content: 0.5x + 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request() -> inference_pb2.PredictRequest:
    tensor = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3], content=np.asarray(X, "<f4").tobytes()
    )
    return inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": tensor})


def answer(stub: Any) -> tuple[int, list[float]]:
    try:
        reply = stub.Predict(request(), timeout=5)
    except grpc.RpcError:
        return 0, []
    return reply.version, np.frombuffer(reply.outputs["y"].content, dtype="<f4").tolist()


def until(stub: Any, version: int, y: list[float], started: float, timeout: float) -> float:
    while time.monotonic() - started < timeout:
        if answer(stub) == (version, y):
            return time.monotonic() - started
        time.sleep(0.01)
    raise SystemExit(f"version {version} did not answer {y} within {timeout} s")


def start_stack(work: Path, settle: str | None) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``modelmux up`` over a relocated copy of the quickstart; returns it, its address and the
    half_plus_two source folder."""
    models = work / "source"
    shutil.copytree(SOURCE, models, ignore=shutil.ignore_patterns(".done"))
    doc = yaml.safe_load(QUICKSTART.read_text())
    sync, gateway, backend = (f"127.0.0.1:{free_port()}" for _ in range(3))
    doc["gateway"].update(listen=gateway, modelsync=sync)
    doc["modelsync"].update(listen=sync, target=str(work / "volume"))
    if settle is not None:
        doc["modelsync"]["settle"] = settle
    doc["backends"][0]["address"] = backend
    for api in doc["apis"]:
        handler = api["handler"]
        for key in ("path", "protobuf_path"):
            if key in handler:
                handler[key] = str((QUICKSTART.parent / handler[key]).resolve())
        sources = handler.get("models") or handler.get("multi_model_reloading") or {}
        entries = [sources, *sources.get("paths", [])]
        for entry in entries:
            for key in ("path", "dir"):
                if key in entry:
                    rel = (QUICKSTART.parent / entry[key]).resolve().relative_to(SOURCE)
                    entry[key] = str(models / rel)
    config = work / "modelmux.yaml"
    config.write_text(yaml.safe_dump(doc))
    log = open(work / "up.log", "wb")  # noqa: SIM115 (open for the stack's lifetime)
    up = subprocess.Popen(
        [sys.executable, "-m", "modelmux_common.cli", "up", "--config", str(config)],
        stdout=log,
        stderr=log,
        cwd=ROOT,
    )
    return up, gateway, models / "half_plus_two"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gateway", help="a running stack's gateway (default: start one)")
    parser.add_argument("--source", type=Path, help="its half_plus_two source folder")
    parser.add_argument("--settle", help="modelsync.settle of the stack started (default: as is)")
    args = parser.parse_args()
    if not (SOURCE / "half_plus_two" / "2").is_dir():
        raise SystemExit("run `make models` first")
    work = Path(tempfile.mkdtemp(prefix="modelmux-measure-"))
    up = None
    if args.gateway:
        address, folder = args.gateway, args.source or SOURCE / "half_plus_two"
    else:
        up, address, folder = start_stack(work, args.settle)
    added, rewritten = [], []
    try:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            deadline = time.monotonic() + 300
            while answer(stub)[0] == 0:
                if time.monotonic() > deadline or (up is not None and up.poll() is not None):
                    raise SystemExit(f"the stack did not serve; see {work / 'up.log'}")
                time.sleep(0.2)
            for _ in range(args.rounds):
                version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit()) + 1
                target = folder / str(version)
                subprocess.run(["cp", "-r", str(folder / "2"), str(target)], check=True)
                started = time.monotonic()
                added.append(until(stub, version, ADDED, started, 30))
                time.sleep(1.0)
                staged = work / f"rewrite-{version}"
                shutil.copytree(folder / "1", staged)
                subprocess.run(["cp", "-r", f"{staged}/.", str(target)], check=True)
                started = time.monotonic()
                rewritten.append(until(stub, version, REWRITTEN, started, 30))
                time.sleep(1.0)
                if args.gateway:
                    shutil.rmtree(target)
    finally:
        if up is not None:
            up.send_signal(signal.SIGINT)
            up.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    for name, values in (("cp -r of a new version", added), ("in-place rewrite", rewritten)):
        print(
            f"{name}: served after min {min(values):.2f} / median "
            f"{statistics.median(values):.2f} / max {max(values):.2f} s ({len(values)} rounds)"
        )


if __name__ == "__main__":
    os.environ.setdefault("MODELMUX_LOG_FORMAT", "json")
    main()

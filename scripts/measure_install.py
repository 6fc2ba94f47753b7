#!/usr/bin/env python3
"""Install weight: the installed size of each virtualenv, and the start time and idle RSS of a
gateway run from each, side by side (docs/benchmarks.md, "Install weight").

    measure_install.py [--slim DIR] [--runtime DIR] [--full DIR] [--rounds N] [--out FILE]

* ``gateway-only``: ``pip install .`` without the backend extra (``--slim``, a venv made by
  scripts/gateway_venv.py; built in a temporary folder when not given).
* ``runtime``: ``pip install '.[backend]'`` (``--runtime``, made by ``gateway_venv.py --backend``;
  measured only when given): what a machine running the embedded backend too installs.
* ``full``: the development venv ``make venv`` makes (``--full``, default .venv): the backend and
  dev extras.

Size is the apparent size of every file in the venv. Each gateway reads half_plus_two from
``--models`` (no modelsync) and configures one embedded backend started from the full venv; the
venvs take turns, after one warm-up start, so the backend is equally warm for all. Start time is
spawn to grpc health SERVING; idle RSS is the gateway's resident size ``--idle`` seconds after
that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gateway_venv
from bench_stack import ROOT, Child, gateway_config, health_serving, memory_mib

MIB = 1024 * 1024
DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps(sorted({d.metadata['Name'].lower() for d in m.distributions()})))"
)


def venv_size_mib(venv: Path) -> float:
    total = sum(p.lstat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    return round(total / MIB, 1)


def describe(venv: Path) -> dict[str, Any]:
    names = json.loads(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", DISTRIBUTIONS],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    return {
        "size_mib": venv_size_mib(venv),
        "distributions": len(names),
        "tensorflow": "tensorflow" in names,
    }


@contextmanager
def backend(full: Path, logdir: Path) -> Iterator[str]:
    child = Child(
        "backend",
        [str(full / "bin" / "modelmux"), "backend", "--listen", "127.0.0.1:0"],
        logdir=logdir,
    )
    try:
        yield child.wait_serving(timeout=180)
    finally:
        child.stop()


def start_once(venv: Path, config: Path, *, logdir: Path, name: str, idle: float) -> dict[str, Any]:
    """One gateway from ``venv``: seconds to SERVING, and its RSS once idle."""
    gateway = Child(
        name,
        [str(venv / "bin" / "modelmux"), "gateway", "--config", str(config)],
        logdir=logdir,
        env={"PYTHONPATH": ""},  # nothing from the source tree
    )
    try:
        address = gateway.wait_serving(timeout=120)
        serving = health_serving(address, timeout=120) - gateway.started
        time.sleep(idle)  # the measurement itself: resident size after an idle interval
        return {"serving_s": round(serving, 3), "rss_mib": round(memory_mib([gateway.pid]), 1)}
    finally:
        gateway.stop()


def measure(args: argparse.Namespace, slim: Path, workdir: Path) -> dict[str, Any]:
    venvs = {"gateway-only": slim, "full": args.full}
    if args.runtime is not None:
        venvs["runtime"] = args.runtime
    rows: dict[str, Any] = {name: describe(venv) for name, venv in venvs.items()}
    with backend(args.full, workdir) as address:
        config = gateway_config(
            workdir / "gateway.yaml",
            backend=address,
            source=args.models / "half_plus_two",
            max_bytes=64 * MIB,
            log_requests=False,
        )
        start_once(args.full, config, logdir=workdir, name="warm-up", idle=0)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in venvs}
        for i in range(args.rounds):
            for name, venv in venvs.items():
                run = start_once(venv, config, logdir=workdir, name=f"{name}-{i}", idle=args.idle)
                rounds[name].append(run)
    for name, runs in rounds.items():
        rows[name] |= {
            "serving_s": statistics.median(r["serving_s"] for r in runs),
            "idle_rss_mib": statistics.median(r["rss_mib"] for r in runs),
            "rounds": runs,
        }
    return {"venvs": rows, "rounds": args.rounds, "idle_s": args.idle}


def table(results: dict[str, Any]) -> str:
    lines = [
        "| install | installed size | distributions | TensorFlow | gateway start to SERVING"
        " | gateway idle RSS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results["venvs"].items():
        lines.append(
            f"| {name} | {row['size_mib']:.0f} MiB | {row['distributions']} |"
            f" {'yes' if row['tensorflow'] else 'no'} | {row['serving_s']:.2f} s |"
            f" {row['idle_rss_mib']:.1f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slim", type=Path, help="a gateway-only venv (default: build one)")
    parser.add_argument("--runtime", type=Path, help="a venv with the backend extra, no dev")
    parser.add_argument("--full", type=Path, default=ROOT / ".venv")
    parser.add_argument("--models", type=Path, default=ROOT / ".modelmux" / "source")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before the RSS")
    parser.add_argument("--quick", action="store_true", help="one round, one second idle")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.idle = 1, 1.0
    with tempfile.TemporaryDirectory(prefix="measure-install-") as tmp:
        workdir = Path(tmp)
        slim = args.slim or gateway_venv.build(workdir / "gateway-only")
        results = measure(args, slim, workdir)
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Builds the gateway-only install: ``gateway_venv.py DEST`` makes ``DEST/venv``, a virtualenv
holding modelmux installed without the ``backend`` extra, from the same files the gateway image
installs (deploy/docker/gateway.Dockerfile), so without TensorFlow. It runs ``modelmux gateway``
and ``modelmux sync`` (and handler workers); ``modelmux backend`` says it needs the extra.
``--backend`` builds the runtime install with the extra instead (what the backend image
installs), for comparison.

pip installs from its wheel cache when it can. tests/test_gateway_install.py and
scripts/measure_install.py use it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what deploy/docker/gateway.Dockerfile copies into its build stage (tests check they agree)
SOURCES = (
    "pyproject.toml",
    "README.md",
    "gateway",
    "modelsync",
    "modelmux_common",
    "clients/modelmux",
)


def base_python() -> str:
    """The interpreter this one's virtualenv was made from (a venv made from a venv's python
    would work too, but say plainly which Python the install uses)."""
    return str(getattr(sys, "_base_executable", sys.executable))


def build(
    dest: Path, *, backend: bool = False, python: str | None = None, timeout: float = 1800
) -> Path:
    """``dest/src`` (a copy of SOURCES, and of backend/ with ``backend``) installed into a new
    ``dest/venv`` (with the backend extra when ``backend``); returns the venv."""
    source = dest / "src"
    for name in (*SOURCES, "backend") if backend else SOURCES:
        origin, copy = ROOT / name, source / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, copy)
    venv = dest / "venv"
    subprocess.run([python or base_python(), "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    subprocess.run(
        [*pip, f"{source}[backend]" if backend else str(source)], check=True, timeout=timeout
    )
    return venv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="an empty or new folder")
    parser.add_argument("--backend", action="store_true", help="with the backend extra")
    args = parser.parse_args()
    print(build(args.dest, backend=args.backend))


if __name__ == "__main__":
    main()

"""The TypeScript client (clients/ts) under Node's own test runner, against a live gateway process
and the embedded backend: Predict with typed arrays, Invoke and ListModels through the generated
@grpc/grpc-js clients. `make test` installs the npm packages from clients/ts/package-lock.json."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import start_client_gateway
from conftest import ROOT, Proc

TS = ROOT / "clients" / "ts"


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> Iterator[Proc]:
    proc = start_client_gateway(
        tmp_path_factory.mktemp("ts-gw"), models=example_models, backend=backend
    )
    yield proc
    proc.stop()


def test_node_client_against_a_live_gateway(gateway: Proc) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed for the TypeScript client's tests"
    tsc = TS / "node_modules" / ".bin" / "tsc"
    assert tsc.exists(), "clients/ts has no node_modules: run `make ts-deps` (make test does)"
    build = subprocess.run([str(tsc), "-p", str(TS)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    tests = sorted(str(p) for p in (TS / "dist" / "test").glob("*.test.js"))
    assert tests
    run = subprocess.run(
        [node, "--test", "--test-reporter=spec", *tests],
        cwd=TS,
        env={**os.environ, "MODELMUX_ADDRESS": gateway.address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr

"""The gateway-only install (`pip install .`, no backend extra) in a fresh virtualenv: no
TensorFlow or tensorflow-serving-api in it; its `modelmux sync` and `modelmux gateway` serve the
example models through the embedded backend of the full install, to the official TF Serving stub
and to grpcurl, and run a TensorFlow handler; its `modelmux backend` says what it lacks; and
scripts/measure_install.py measures it (docs/benchmarks.md, "Install weight")."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from client_helpers import HANDLERS
from conftest import ROOT, Proc, start_daemon
from gateway_helpers import wait_serving
from modelsync_helpers import free_port

import backend.tfserving as official  # TensorFlow's own classes: the client side

sys.path.insert(0, str(ROOT / "scripts"))
import gateway_venv

TENSORFLOW = re.compile(r"^(tensorflow|tf[-_]|keras|tensorboard|ml[-_]dtypes)", re.IGNORECASE)

CHECK_IMPORTS = """
import importlib.util, sys
import gateway.server, modelsync.daemon, modelmux.client, modelmux_common.tfserving
absent = [m for m in ("tensorflow", "tensorflow_serving", "backend") if importlib.util.find_spec(m)]
assert not absent, f"installed but must not be: {absent}"
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_serving"))
assert not loaded, loaded
print(gateway.server.__file__)
"""


@pytest.fixture(scope="module")
def slim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gateway_venv.build(tmp_path_factory.mktemp("gateway-only"))


def clean_env() -> dict[str, str]:
    """This environment without what would point a child at the source tree or this venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_image_installs_what_the_slim_venv_installs() -> None:
    dockerfile = (ROOT / "deploy/docker/gateway.Dockerfile").read_text()
    copied = re.findall(r"^COPY (?!--)(\S+) ", dockerfile, re.MULTILINE)
    first = re.search(r"^COPY (\S+) (\S+) \./$", dockerfile, re.MULTILINE)
    assert first is not None
    assert [*first.groups(), *copied[1:]] == list(gateway_venv.SOURCES)
    assert "pip install --no-cache-dir . " in dockerfile  # no extra: the backend stays out


def test_no_tensorflow_is_installed(slim: Path, tmp_path: Path) -> None:
    listed = run(slim, "python", "-m", "pip", "list", "--format=json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = [p["name"] for p in json.loads(listed.stdout)]
    assert "modelmux" in names and "grpcio" in names
    assert not [n for n in names if TENSORFLOW.match(n)], names
    imported = run(slim, "python", "-c", CHECK_IMPORTS, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(str(slim))  # the installed copy, not the source tree


def test_backend_says_it_needs_the_extra(slim: Path, tmp_path: Path) -> None:
    done = run(slim, "modelmux", "backend", "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert done.returncode == 1
    assert "pip install 'modelmux[backend]'" in done.stderr


def stack_config(root: Path, *, models: Path, backend: Proc) -> Path:
    """One file for both daemons: modelsync mirrors half_plus_two and iris onto a volume, the
    gateway follows it; iris runs behind a TensorFlow handler."""
    sync_address = f"127.0.0.1:{free_port()}"
    half_plus_two = {"name": "half_plus_two", "path": str(models / "half_plus_two")}
    iris = {
        "type": "tensorflow",
        "path": str(HANDLERS / "iris_predictor.py"),
        "models": {"path": str(models / "iris")},
    }
    doc = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "modelsync": sync_address,
            "status_interval": "200ms",
            "shutdown_grace": "2s",
        },
        "modelsync": {
            "listen": sync_address,
            "target": str(root / "volume"),
            "settle": "0s",
            "debounce": "200ms",
        },
        "backends": [{"name": "cpu-0", "address": backend.address}],
        "apis": [
            {"name": "half-plus-two", "handler": {"models": {"paths": [half_plus_two]}}},
            {"name": "iris", "handler": iris},
        ],
    }
    config = root / "modelmux.yaml"
    config.write_text(yaml.safe_dump(doc))
    return config


@pytest.fixture(scope="module")
def stack(
    slim: Path, example_models: Path, backend: Proc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Proc, Proc]]:
    """modelsync and a gateway following it, both from the slim venv, in front of the full
    install's embedded backend (which loads from the volume modelsync writes)."""
    root = tmp_path_factory.mktemp("slim-stack")
    config = str(stack_config(root, models=example_models, backend=backend))
    modelmux = [str(slim / "bin" / "modelmux")]
    env = {"PYTHONPATH": ""}  # nothing from the source tree
    sync = start_daemon(["sync", "--config", config], command=modelmux, env=env)
    try:
        gateway = start_daemon(["gateway", "--config", config], command=modelmux, env=env)
        try:
            wait_serving(gateway.address, timeout=90)
            yield gateway, sync
            assert gateway.stop() == 0
        finally:
            gateway.stop()
        assert sync.stop() == 0
    finally:
        sync.stop()


def test_the_official_stub_predicts_through_the_slim_gateway(stack: tuple[Proc, Proc]) -> None:
    gateway, _ = stack
    with grpc.insecure_channel(gateway.address) as channel:
        stub = official.prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = official.predict_pb2.PredictRequest()
        request.model_spec.name = "half_plus_two"
        x = request.inputs["x"]
        x.dtype = official.types_pb2.DT_FLOAT
        x.tensor_shape.dim.add(size=3)
        x.float_val.extend([1.0, 2.0, 5.0])
        reply = stub.Predict(request, timeout=20)
        assert reply.model_spec.version.value == 2
        y = reply.outputs["y"]
        assert (list(y.float_val) or np.frombuffer(y.tensor_content, "<f4").tolist()) == [
            3.5,
            4,
            5.5,
        ]
        models = official.model_service_pb2_grpc.ModelServiceStub(channel)
        status = official.get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "half_plus_two"
        states = {
            s.version: s.state
            for s in models.GetModelStatus(status, timeout=20).model_version_status
        }
        available = official.get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert states == {1: available, 2: available}


def grpcurl(*args: str) -> Any:
    """The real grpcurl (the full venv's), its JSON answer parsed."""
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "grpcurl"), "-plaintext", "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.startswith("{") else done.stdout


def floats(tensor: dict[str, Any]) -> list[float]:
    """A TensorProto as grpcurl prints it: tensor_content base64, or float_val."""
    if "tensor_content" in tensor:
        return np.frombuffer(base64.b64decode(tensor["tensor_content"]), "<f4").tolist()
    return [float(v) for v in tensor["float_val"]]


def test_grpcurl_describes_and_calls_the_slim_gateway(stack: tuple[Proc, Proc]) -> None:
    gateway, _ = stack
    described = grpcurl(gateway.address, "describe", "tensorflow.serving.PredictionService")
    assert "rpc Predict ( .tensorflow.serving.PredictRequest )" in described
    x = {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": 2}]}, "float_val": [0, 4]}
    body = {"model_spec": {"name": "half_plus_two", "version": 1}, "inputs": {"x": x}}
    method = "tensorflow.serving.PredictionService/Predict"
    reply = grpcurl("-d", json.dumps(body), gateway.address, method)
    assert reply["model_spec"]["version"] == "1"
    assert floats(reply["outputs"]["y"]) == [2.0, 4.0]


def test_a_tensorflow_handler_and_modelsync_run_from_the_slim_install(
    stack: tuple[Proc, Proc],
) -> None:
    gateway, sync = stack
    iris = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    body = json.dumps({"api": "iris", "json": iris})
    invoked = grpcurl("-d", body, gateway.address, "modelmux.v1.Inference/Invoke")
    assert invoked["json"] == "setosa"  # tensorflow_client.predict in a handler worker
    listed = grpcurl(sync.address, "modelmux.modelsync.v1.ModelSync/ListModels")
    assert {m["name"] for m in listed["models"]} >= {"half_plus_two", "iris"}


def test_measure_install_reports_both_venvs(
    slim: Path, example_models: Path, tmp_path: Path
) -> None:
    out = tmp_path / "install.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "measure_install.py"),
            "--quick",
            *("--slim", str(slim), "--models", str(example_models), "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    slim_row, full_row = results["venvs"]["gateway-only"], results["venvs"]["full"]
    assert slim_row["tensorflow"] is False and full_row["tensorflow"] is True
    assert 0 < slim_row["size_mib"] < full_row["size_mib"] / 4
    for row in (slim_row, full_row):
        assert row["serving_s"] > 0 and row["idle_rss_mib"] > 10

"""The gateway's TF Serving facade as reflection and grpcurl see it, now that the gateway describes
it from modelmux's own definitions: the same as TensorFlow's own descriptors show it (the embedded
backend, which imports TensorFlow, serves those), service by service, method by method, message by
message; and grpcurl's JSON calls through the gateway answer as they do from the backend."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from client_helpers import start_client_gateway
from conftest import ROOT, Proc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, ServiceDescriptor

import backend.tfserving  # noqa: F401  (TensorFlow's descriptors in this process's default pool)

GRPCURL = shutil.which("grpcurl") or str(Path(ROOT, ".venv", "bin", "grpcurl"))
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


def _service(name: str) -> ServiceDescriptor:
    return descriptor_pool.Default().FindServiceByName(name)


def symbols() -> list[str]:
    """The two services, their methods, and every message and enum their methods reach."""
    found: list[str] = []
    todo: list[Descriptor] = []
    for name in SERVICES:
        service = _service(name)
        found.append(name)
        for method in service.methods:
            found.append(method.full_name)
            todo += [method.input_type, method.output_type]
    seen: set[str] = set()
    while todo:
        message = todo.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            if field.message_type is not None:
                todo.append(field.message_type)
            if field.enum_type is not None:
                seen.add(field.enum_type.full_name)
    return found + sorted(seen)


def run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def grpcurl(*args: str) -> str:
    done = run_grpcurl(*args)
    assert done.returncode == 0, f"grpcurl {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> Iterator[Proc]:
    """A gateway process (which never imports TensorFlow) in front of the shared backend."""
    proc = start_client_gateway(
        tmp_path_factory.mktemp("reflect-gw"), models=example_models, backend=backend
    )
    yield proc
    proc.stop()


def test_grpcurl_describes_every_facade_symbol_as_tensorflow_does(
    gateway: Proc, backend: Proc
) -> None:
    names = symbols()
    assert len(names) > 70

    def describe(address: str, name: str) -> tuple[int, str, str]:
        done = run_grpcurl(address, "describe", name)
        return done.returncode, done.stdout, done.stderr

    def both(name: str) -> tuple[str, tuple[int, str, str], tuple[int, str, str]]:
        return name, describe(gateway.address, name), describe(backend.address, name)

    with ThreadPoolExecutor(8) as pool:
        described = list(pool.map(both, names))
    # the same answer, or the same refusal: reflection finds no file for a method's own name,
    # whichever pool it reads
    different = [name for name, ours, theirs in described if ours != theirs]
    assert not different, different
    answered = {name: ours[1] for name, ours, _ in described if ours[0] == 0}
    methods = {m.full_name for s in SERVICES for m in _service(s).methods}
    assert set(answered) == set(names) - methods
    assert (
        "map<string, .tensorflow.TensorProto> inputs = 2;"
        in answered["tensorflow.serving.PredictRequest"]
    )


def test_grpcurl_lists_the_facade_s_methods_as_tensorflow_does(
    gateway: Proc, backend: Proc
) -> None:
    for service in SERVICES:
        assert grpcurl(gateway.address, "list", service) == grpcurl(
            backend.address, "list", service
        )
    listed = grpcurl(gateway.address, "list").split()
    assert set(SERVICES) <= set(listed) and "modelmux.v1.Inference" in listed


def test_grpcurl_json_calls_answer_as_the_backend_does(gateway: Proc, backend: Proc) -> None:
    """grpcurl encodes and decodes with what reflection gave it: our descriptors at the gateway,
    TensorFlow's at the backend (GetModelMetadata's Any is resolved through reflection too)."""
    predict = {
        "model_spec": {"name": "half_plus_two", "version": 1},
        "inputs": {
            "x": {
                "dtype": "DT_FLOAT",
                "tensor_shape": {"dim": [{"size": 3}]},
                "float_val": [1, 2, 5],
            }
        },
    }
    metadata = {"model_spec": {"name": "half_plus_two"}, "metadata_field": ["signature_def"]}
    status = {"model_spec": {"name": "half_plus_two"}}
    calls = [
        ("tensorflow.serving.PredictionService/Predict", predict),
        ("tensorflow.serving.PredictionService/GetModelMetadata", metadata),
        ("tensorflow.serving.ModelService/GetModelStatus", status),
    ]
    for method, body in calls:
        data = json.dumps(body)
        ours = json.loads(grpcurl("-d", data, gateway.address, method))
        theirs = json.loads(grpcurl("-d", data, backend.address, method))
        assert ours == theirs, method
    y = json.loads(grpcurl("-d", json.dumps(predict), gateway.address, calls[0][0]))["outputs"]
    assert y["y"]["dtype"] == "DT_FLOAT"


IMPORTS = """
import sys
from google.protobuf import descriptor_pool
import gateway.server, modelsync.daemon, modelmux.client, modelmux_common.cli
import modelmux_common.tfserving
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_serving"))
assert not loaded, loaded
try:
    descriptor_pool.Default().FindFileByName("tensorflow_serving/apis/predict.proto")
except KeyError:
    print("not in the default pool")
"""


def test_the_gateway_loads_nothing_of_tensorflow_even_where_it_is_installed() -> None:
    """So a gateway's reflection can only be describing modelmux's own definitions."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "not in the default pool"

"""The example APIs of examples/ as `make run` serves them: the quickstart config, with loopback ports
chosen by the system, a temporary volume and the example models written by make_models.py (the
session's example_models), run by a real backend, modelsync and gateway. Each example API is
called once, and the grpcurl commands of the README, docs/calling.md and docs/handlers.md's examples
are run against the stack."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import MODELMUX, ROOT, Proc, start_daemon
from gateway_helpers import wait_serving
from google.protobuf import json_format
from test_gateway import GRPCURL, IRIS, IRIS_INPUTS

from modelmux.client import Client
from modelmux.v1 import inference_pb2, inference_pb2_grpc

QUICKSTART = ROOT / "examples" / "quickstart" / "modelmux.yaml"
QUICKSTART_SOURCE = ROOT / ".modelmux" / "source"
SERVICE = "example.halfplustwo.v1.HalfPlusTwo"


def relocate(value: str, models: Path) -> str:
    """A source folder of the quickstart (under .modelmux/source/) as the same folder under
    ``models``."""
    resolved = (QUICKSTART.parent / value).resolve()
    return str(models / resolved.relative_to(QUICKSTART_SOURCE))


def quickstart_config(root: Path, models: Path, backend: str) -> Path:
    """examples/quickstart/modelmux.yaml with every address, folder and file made test-local."""
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["gateway"].update(
        listen="127.0.0.1:0",
        status_interval="200ms",
        shutdown_grace="1s",
        state_dir=str(root / "state"),
        metrics_listen="127.0.0.1:0",
    )
    doc["modelsync"].update(
        listen="127.0.0.1:0",
        target=str(root / "volume"),
        settle="0s",
        debounce="200ms",
        metrics_listen="127.0.0.1:0",
    )
    doc["backends"] = [{**doc["backends"][0], "address": backend, "metrics_listen": "127.0.0.1:0"}]
    for api in doc["apis"]:
        handler = api["handler"]
        for key in ("path", "protobuf_path"):
            if key in handler:
                handler[key] = str((QUICKSTART.parent / handler[key]).resolve())
        sources = handler.get("models") or handler.get("multi_model_reloading") or {}
        for key in ("path", "dir"):
            if key in sources:
                sources[key] = relocate(sources[key], models)
        for entry in sources.get("paths", []):
            entry["path"] = relocate(entry["path"], models)
    config = root / "modelmux.yaml"
    config.write_text(yaml.safe_dump(doc))
    return config


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory, example_models: Path) -> Iterator[Proc]:
    root = tmp_path_factory.mktemp("quickstart")
    backend = start_daemon(["backend", "--listen", "127.0.0.1:0", "--poll-interval", "200ms"])
    procs = [backend]
    try:
        config = quickstart_config(root, example_models, backend.address)
        sync = start_daemon(["sync", "--config", str(config)])
        procs.insert(0, sync)
        gateway = start_daemon(
            ["gateway", "--config", str(config)], env={"MODELMUX_GATEWAY_MODELSYNC": sync.address}
        )
        procs.insert(0, gateway)
        wait_serving(gateway.address)
        yield gateway
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def stub(quickstart: Proc) -> Iterator[inference_pb2_grpc.InferenceStub]:
    with grpc.insecure_channel(quickstart.address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def invoke(stub: inference_pb2_grpc.InferenceStub, api: str, payload: Any, **query: str) -> Any:
    request = inference_pb2.InvokeRequest(api=api, query_params=query)
    json_format.ParseDict(payload, request.json)
    reply = stub.Invoke(request, timeout=30)
    return json_format.MessageToDict(reply.json)


def flower(name: str) -> dict[str, float]:
    return dict(zip(IRIS_INPUTS, IRIS[name], strict=True))


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def messages(stdout: str) -> list[Any]:
    """grpcurl's output: one pretty-printed JSON document per message."""
    return [json.loads(doc) for doc in re.split(r"(?<=\})\n(?=\{)", stdout.strip())]


def test_iris_labels_one_flower_or_several(stub: inference_pb2_grpc.InferenceStub) -> None:
    for name in IRIS:
        assert invoke(stub, "iris", flower(name)) == name
    batch = {k: [IRIS[n][i] for n in IRIS] for i, k in enumerate(IRIS_INPUTS)}
    assert invoke(stub, "iris", batch) == list(IRIS)


def test_multi_model_picks_model_and_version_from_query_params(
    stub: inference_pb2_grpc.InferenceStub,
) -> None:
    x = {"x": [1.0, 2.0, 5.0]}
    v1 = invoke(stub, "multi-model", x, model="half_plus_two", version="1")
    assert v1 == {"model": "half_plus_two", "version": 1, "outputs": {"y": [2.5, 3.0, 4.5]}}
    latest = invoke(stub, "multi-model", x, model="half_plus_two")
    assert latest["version"] == 2 and latest["outputs"] == {"y": [3.5, 4.0, 5.5]}
    iris = invoke(stub, "multi-model", flower("virginica"), model="iris", version="latest")
    assert iris["outputs"]["class_ids"] == [[2]]  # shaped [-1, 1], not flattened
    assert len(iris["outputs"]["probabilities"][0]) == 3
    with pytest.raises(grpc.RpcError) as err:
        invoke(stub, "multi-model", x)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_python_handler_loads_json_models_within_its_cache(
    stub: inference_pb2_grpc.InferenceStub, quickstart: Proc
) -> None:
    celsius = {"celsius": [0, 100, -40]}
    for _ in range(2):  # cache_size 1: every switch evicts the other model
        assert invoke(stub, "python-handler", celsius, model="fahrenheit") == {
            "fahrenheit": [32, 212, -40]
        }
        assert invoke(stub, "python-handler", {"celsius": 37}, model="kelvin", version="1") == {
            "kelvin": 310.15
        }
    loads = [x for x in quickstart.lines if x.get("event") == "model_loaded"]
    assert {x["model"] for x in loads} >= {"fahrenheit", "kelvin"}
    assert all("/cache-" in str(x["path"]) for x in loads)  # loaded from the disk cache
    assert any(x.get("event") == "models_evicted" for x in quickstart.lines)


def test_user_proto_service_through_reflection(quickstart: Proc) -> None:
    address = quickstart.address
    listed = grpcurl(address, "list")
    assert SERVICE in listed.stdout.split(), listed.stderr
    described = grpcurl(address, "describe", SERVICE)
    assert "rpc Compute ( .example.halfplustwo.v1.ComputeRequest )" in described.stdout
    assert "returns ( stream .example.halfplustwo.v1.ComputeStreamResponse )" in described.stdout
    unary = grpcurl("-d", '{"x":[1.0,2.0,5.0]}', address, f"{SERVICE}/Compute")
    assert unary.returncode == 0, unary.stderr
    assert messages(unary.stdout) == [{"y": [3.5, 4, 5.5], "version": "2"}]
    stream = grpcurl("-d", '{"x":[1.0,2.0,5.0],"version":"1"}', address, f"{SERVICE}/ComputeStream")
    assert stream.returncode == 0, stream.stderr
    assert messages(stream.stdout) == [
        {"x": 1, "y": 2.5, "version": "1"},
        {"x": 2, "y": 3, "version": "1"},
        {"x": 5, "y": 4.5, "version": "1"},
    ]


def doc_commands(page: str, heading: str) -> list[list[str]]:
    """The grpcurl commands of the first sh block under a heading of a page, as argument lists."""
    text = (ROOT / page).read_text()
    block = text.split(f"\n{heading}\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("grpcurl ")]


@pytest.mark.parametrize(
    ("page", "heading", "at_least"),
    [
        ("README.md", "## Calling it with grpcurl", 6),
        ("docs/calling.md", "## With grpcurl", 10),
        ("docs/handlers.md", "## The examples", 8),
    ],
)
def test_documented_commands_succeed(
    quickstart: Proc, page: str, heading: str, at_least: int
) -> None:
    commands = doc_commands(page, heading)
    assert len(commands) >= at_least
    last_id = ""  # `<id>` in a command: the request or job id the latest reply named
    for command in commands:
        args = [quickstart.address if a == "127.0.0.1:8500" else a for a in command[1:]]
        args = [a.replace("<id>", last_id) for a in args if a != "-plaintext"]
        done = grpcurl(*args)
        assert done.returncode == 0 and done.stdout.strip(), (command, done.stderr)
        named = re.search(r'"job_?[iI]d": "([^"]+)"', done.stdout) or re.search(
            r'"id": "([^"]+)"', done.stdout
        )
        last_id = named.group(1) if named else last_id


def test_user_proto_passes_nan_and_infinity_both_ways(quickstart: Proc) -> None:
    """Non-finite floats through an API's own proto: in the request (grpcurl writes them as the
    strings protobuf's JSON mapping uses) and in the handler's dict reply (issue 18)."""
    done = grpcurl(
        "-d", '{"x":["NaN",1.0,"Infinity","-Infinity"]}', quickstart.address, f"{SERVICE}/Compute"
    )
    assert done.returncode == 0, done.stderr
    assert messages(done.stdout) == [{"y": ["NaN", 3.5, "Infinity", "-Infinity"], "version": "2"}]


def test_async_example_answers_through_watch_and_get(quickstart: Proc) -> None:
    names = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    flower = dict(zip(names, IRIS["setosa"], strict=True))
    with Client(quickstart.address, timeout=30) as client:
        rid = client.submit("iris-async", flower)
        states = [update.state for update in client.watch(rid, timeout=60)]
        assert states[-1] == "COMPLETED"
        result = client.get(rid).result
    assert isinstance(result, dict)
    assert (result["request_id"], result["label"]) == (rid, "setosa")


def test_batch_example_writes_predictions_and_the_hook_sums_them(
    quickstart: Proc, tmp_path: Path
) -> None:
    """The command of examples/batch/handler.py, with a job config that moves the results."""
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"results": str(tmp_path / "results")}))
    flowers = ROOT / "examples" / "batch" / "flowers.ndjson"
    command = ["job", "submit", "--api", "iris-batch", "--workers", "2", "--ndjson", str(flowers)]
    options = ["--batch-size", "4", "--config", str(config), "--watch"]
    done = subprocess.run(
        [*MODELMUX, *command, *options, "--address", quickstart.address],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.split()[1]
    folder = tmp_path / "results" / job_id
    batches = sorted(folder.glob("*.ndjson"))
    assert len(batches) == 3
    lines = [json.loads(line) for path in batches for line in path.read_text().splitlines()]
    expected = [json.loads(line) for line in flowers.read_text().splitlines()]
    assert sorted(map(json.dumps, (x["flower"] for x in lines))) == sorted(
        map(json.dumps, expected)
    )
    for line in lines:
        values = [line["flower"][name] for name in IRIS_INPUTS]
        assert IRIS[line["label"]] == values, line
    summary = json.loads((folder / "summary.json").read_text())
    assert summary == {
        "job_id": job_id,
        "flowers": 12,
        "labels": {"setosa": 4, "versicolor": 4, "virginica": 4},
    }

"""Hostile clients against real gateway and modelsync processes, on loopback: a bounded fuzz of every
method their reflection lists (random bytes and mutated valid messages), and live property tests
of echo, labels and non-finite JSON. No call may get INTERNAL or UNKNOWN, hang, or leave the
gateway bigger; no process (handler workers included) may die."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from conftest import Proc, start_daemon
from fuzz_helpers import Method, generated, mutants, one_call, reflected_methods, rss_mb
from gateway_helpers import wait_for, wait_serving, write_config
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.test_tensors import as_json

from gateway.errors import STATUS_LIMIT
from modelmux.modelsync.v1 import modelsync_pb2
from modelmux.v1 import async_pb2, inference_pb2, models_pb2, tensor_pb2
from modelmux_common.config import NAME_RE
from modelmux_common.tfserving import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    predict_pb2,
    regression_pb2,
    types_pb2,
)
from modelmux_common.tfserving import (
    inference_pb2 as tf_inference_pb2,
)

HANDLERS = Path(__file__).parent / "handlers"
MUTANTS = 32  # per seed message, per round
FUZZ_SECONDS = 45.0  # both rounds of mutants, whatever the machine's load (the suite's bound)
# the log events of something that broke inside the gateway (a call's INTERNAL, a handler worker
# that died, an async run or a modelsync tick that crashed)
BROKEN = {"internal_error", "handler_worker_exited", "async_run_crashed", "tick_crashed"}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> Iterator[tuple[Proc, Proc]]:
    """A gateway (reading the example models' folders; a user-defined service; an AsyncAPI) and
    a modelsync mirroring the same folders."""
    root = tmp_path_factory.mktemp("fuzz")
    config = write_config(
        root / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"log_requests": False, "state_dir": str(root / "state")},
    )
    doc = yaml.safe_load(config.read_text())
    doc["modelsync"] = {"listen": "127.0.0.1:0", "target": str(root / "volume"), "settle": "0s"}
    iris = doc["apis"][1]["handler"]  # the iris model behind acme.iris.v1.IrisClassifier
    iris["path"] = str(HANDLERS / "iris_service.py")
    iris["protobuf_path"] = str(HANDLERS / "iris_service.proto")
    recorder = {"log": str(root / "async.log")}
    doc["apis"].append(
        {
            "name": "fuzz-async",
            "kind": "AsyncAPI",
            "handler": {"type": "python", "path": str(HANDLERS / "async_recorder.py"),
                        "config": recorder},
            "async": {"store": "embedded", "max_attempts": 1},
        }
    )  # fmt: skip
    config.write_text(yaml.safe_dump(doc))
    gateway = start_daemon(["gateway", "--config", str(config)], timeout=90)
    try:
        sync = start_daemon(["sync", "--config", str(config)], timeout=60)
    except BaseException:
        gateway.stop()
        raise
    try:
        wait_serving(gateway.address, timeout=60)
        yield gateway, sync
    finally:
        sync.stop()
        gateway.stop()


# --- seeds: valid messages, by method; a method reflected without one gets a generated one ----


def typed_predict() -> bytes:
    x = np.asarray([1.0, 2.0], dtype="<f4")
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2], content=x.tobytes())
    return inference_pb2.PredictRequest(
        model="half_plus_two", inputs={"x": tensor}
    ).SerializeToString()


def json_predict() -> bytes:
    request = inference_pb2.PredictRequest(model="half_plus_two", version_label="stable")
    request.json_inputs.update({"x": [1.0, "NaN", [2.0]]})
    return request.SerializeToString()


def tf_predict() -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.model_spec.version.value = 1
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].tensor_shape.dim.add().size = 2
    request.inputs["x"].float_val.extend([1.0, 2.0])
    request.output_filter.append("y")
    return bytes(request.SerializeToString())


def tf_spec(message: Any) -> Any:
    message.model_spec.name = "half_plus_two"
    return message


def classify() -> bytes:
    request = tf_spec(classification_pb2.ClassificationRequest())
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(1.0)
    return bytes(request.SerializeToString())


def regress() -> bytes:
    request = tf_spec(regression_pb2.RegressionRequest())
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(1.0)
    return bytes(request.SerializeToString())


def multi_inference() -> bytes:
    request = tf_inference_pb2.MultiInferenceRequest()
    task = request.tasks.add(method_name="tensorflow/serving/regress")
    task.model_spec.name = "half_plus_two"
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(1.0)
    return bytes(request.SerializeToString())


def invoke(api: str) -> bytes:
    request = inference_pb2.InvokeRequest(api=api, query_params={"a": "b"})
    json_format.ParseDict({"x": [1, 2]}, request.json)
    return request.SerializeToString()


def submit() -> list[bytes]:
    """JSON, raw JSON and text payloads (none a dict: the recorder reads "delay" and "fail" there)."""
    as_json = async_pb2.SubmitRequest(api="fuzz-async", id="fuzz-1")
    as_json.json.list_value.values.add().number_value = 1
    raw = async_pb2.SubmitRequest(
        api="fuzz-async", raw=b"[1, [2, 3]]", content_type="application/json"
    )
    text = async_pb2.SubmitRequest(
        api="fuzz-async", raw=b"text", content_type="text/plain; charset=utf-8"
    )
    # refused: a content type that is no metadata value (it was taken, then every run crashed)
    bad = async_pb2.SubmitRequest(api="fuzz-async", raw=b"text", content_type="text/plain\n")
    return [m.SerializeToString() for m in (as_json, raw, text, bad)]


def reflection(name: str) -> bytes:
    return reflection_pb2.ServerReflectionRequest(file_containing_symbol=name).SerializeToString()


ASYNC_ONE = {"api": "fuzz-async", "id": "fuzz-1"}
HEALTH = [health_pb2.HealthCheckRequest(service="").SerializeToString()]
SEEDS: dict[str, list[bytes]] = {
    "/modelmux.v1.Inference/Predict": [typed_predict(), json_predict()],
    "/modelmux.v1.Inference/Invoke": [invoke("half-plus-two"), invoke("iris")],
    "/modelmux.v1.Models/ListModels": [models_pb2.ListModelsRequest().SerializeToString()],
    "/modelmux.v1.Models/GetModel": [models_pb2.GetModelRequest(name="iris").SerializeToString()],
    "/modelmux.v1.Models/SetVersionLabel": [
        models_pb2.SetVersionLabelRequest(model="half_plus_two", label="fuzz", version=1).SerializeToString()
    ],
    "/modelmux.v1.Models/SetTrafficSplit": [
        models_pb2.SetTrafficSplitRequest(model="iris", weights={1: 1}).SerializeToString()
    ],
    "/modelmux.v1.Models/WatchModels": [models_pb2.WatchModelsRequest(models=["iris"]).SerializeToString()],
    "/modelmux.v1.Async/Submit": submit(),
    "/modelmux.v1.Async/Get": [async_pb2.GetRequest(**ASYNC_ONE).SerializeToString()],
    "/modelmux.v1.Async/Watch": [async_pb2.WatchRequest(**ASYNC_ONE).SerializeToString()],
    "/modelmux.v1.Async/Cancel": [async_pb2.CancelRequest(**ASYNC_ONE).SerializeToString()],
    "/modelmux.v1.Async/List": [
        async_pb2.ListRequest(api="fuzz-async", states=[3], page_size=10).SerializeToString()
    ],
    "/tensorflow.serving.PredictionService/Predict": [tf_predict()],
    "/tensorflow.serving.PredictionService/Classify": [classify()],
    "/tensorflow.serving.PredictionService/Regress": [regress()],
    "/tensorflow.serving.PredictionService/MultiInference": [multi_inference()],
    "/tensorflow.serving.PredictionService/GetModelMetadata": [
        tf_spec(get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])).SerializeToString()
    ],
    "/tensorflow.serving.ModelService/GetModelStatus": [
        tf_spec(get_model_status_pb2.GetModelStatusRequest()).SerializeToString()
    ],
    "/tensorflow.serving.ModelService/HandleReloadConfigRequest": [
        model_management_pb2.ReloadConfigRequest().SerializeToString()
    ],
    "/grpc.health.v1.Health/Check": HEALTH,
    "/grpc.health.v1.Health/Watch": HEALTH,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": [
        reflection("modelmux.v1.Inference"),
        reflection("modelmux.modelsync.v1.ModelSync"),
        reflection_pb2.ServerReflectionRequest(list_services="*").SerializeToString(),
    ],
    "/modelmux.modelsync.v1.ModelSync/ListModels": [modelsync_pb2.ListModelsRequest().SerializeToString()],
    "/modelmux.modelsync.v1.ModelSync/WatchEvents": [
        modelsync_pb2.WatchEventsRequest(from_revision=1).SerializeToString()
    ],
}  # fmt: skip
# what the fuzz must have found by reflection, at least (a new service adds itself)
EXPECTED = {
    "modelmux.v1.Inference", "modelmux.v1.Models", "modelmux.v1.Async",
    "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
    "acme.iris.v1.IrisClassifier", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
    "modelmux.modelsync.v1.ModelSync",
}  # fmt: skip

Target = tuple[str, Method, bytes]  # address, method, seed


def targets(gateway: Proc, sync: Proc, rng: random.Random) -> tuple[list[Target], list[str]]:
    """Every reflected method of both servers with its seeds, and the methods given generated
    seeds (no SEEDS entry: a service added since, or a user-defined one)."""
    out: list[Target] = []
    made: list[str] = []
    for address in (gateway.address, sync.address):
        for method in reflected_methods(address):
            seeds = SEEDS.get(method.path)
            if seeds is None:
                seeds = [generated(method.input, rng) for _ in range(2)]
                made.append(method.path)
            out.extend((address, method, seed) for seed in [b"", *seeds])
    found = {m.path.split("/")[1] for _, m, _ in out}
    assert found >= EXPECTED, f"reflection did not list {sorted(EXPECTED - found)}"
    return out, made


async def fuzz_round(
    channels: dict[str, grpc.aio.Channel],
    batches: list[tuple[Target, list[bytes]]],
    deadline: float,
) -> tuple[collections.Counter[str], list[str], bool]:
    """Each target's mutants, concurrently per target; the codes, what went wrong, and whether
    the round ended before ``deadline``."""
    codes: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    for (address, method, _), batch in batches:
        if time.monotonic() > deadline:
            return codes, bad, False
        limit = STATUS_LIMIT + 100
        for result in await asyncio.gather(
            *(one_call(channels[address], method, data, limit) for data in batch)
        ):
            if ":" in result:
                bad.append(result)
            else:
                codes[result] += 1
    return codes, bad, True


async def async_runs_ended(address: str) -> bool:
    """No accepted async request is waiting or running (their runs have logged what they did)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/modelmux.v1.Async/List")
        token = ""
        while True:
            request = async_pb2.ListRequest(
                api="fuzz-async", states=[1, 2], page_size=1000, page_token=token
            )
            reply = async_pb2.ListResponse.FromString(
                await call(request.SerializeToString(), timeout=10)
            )
            if reply.requests:
                return False
            if not (token := reply.next_page_token):
                return True


async def test_fuzz_every_reflected_method_of_the_gateway_and_modelsync(
    stack: tuple[Proc, Proc],
) -> None:
    gateway, sync = stack
    seed = int(os.environ.get("MODELMUX_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    again = f"fuzz seed {seed}: MODELMUX_FUZZ_SEED={seed} repeats this run"
    print(again)
    rng = random.Random(seed)
    found, made = targets(gateway, sync, rng)
    batches = [(t, list(mutants(t[2], rng, MUTANTS))) for t in found]
    worst_health = 0.0
    done = asyncio.Event()

    async def probe() -> None:  # the gateway keeps answering quickly all along
        nonlocal worst_health
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            while not done.is_set():
                started = time.perf_counter()
                await check(HEALTH[0], timeout=10)
                worst_health = max(worst_health, time.perf_counter() - started)
                await asyncio.sleep(0.02)

    channels = {a: grpc.aio.insecure_channel(a) for a in (gateway.address, sync.address)}
    logged = len(gateway.lines), len(sync.lines)
    try:
        # warm up (every seed once), then measure memory before the mutants
        warm = [(t, [t[2]]) for t in found]
        _, warm_bad, _ = await fuzz_round(channels, warm, time.monotonic() + 60)
        before = rss_mb(gateway.pid)
        prober = asyncio.create_task(probe())
        started = time.monotonic()
        deadline = started + FUZZ_SECONDS
        codes, bad, whole = await fuzz_round(channels, batches, deadline)
        assert whole, f"{again}: the first round did not end within {FUZZ_SECONDS} s"
        after_one = rss_mb(gateway.pid)
        # the same mutants again: memory must not grow with repeats
        more, bad_again, _ = await fuzz_round(channels, batches, deadline)
        after = rss_mb(gateway.pid)
        seconds = time.monotonic() - started
        done.set()
        await prober
    finally:
        done.set()
        for channel in channels.values():
            await channel.close()
    codes.update(more)
    print(dict(codes), f"{sum(codes.values())} calls in {seconds:.1f} s,",
          f"worst health check {worst_health * 1000:.1f} ms")  # fmt: skip
    print(
        f"{len(found)} seeds of {len({m.path for _, m, _ in found})} methods; generated for {made}"
    )
    print(f"gateway RSS {before:.1f} MB -> {after_one:.1f} MB -> {after:.1f} MB")
    await wait_for(lambda: async_runs_ended(gateway.address), timeout=30, what="async runs")
    bad = warm_bad + bad + bad_again
    assert not bad, f"{again}\n" + "\n".join(bad[:20])
    broken = [
        e for e in gateway.lines[logged[0] :] + sync.lines[logged[1] :] if e.get("event") in BROKEN
    ]
    assert not broken, f"{again}: {json.dumps(broken[:5])[:3000]}"
    assert sum(codes.values()) > 1000 and codes["INVALID_ARGUMENT"] > 300, codes
    assert worst_health < 0.5, f"a health check took {worst_health * 1000:.0f} ms"
    assert after - after_one < 5 and after - before < 30, (before, after_one, after)
    assert gateway.popen.poll() is None and sync.popen.poll() is None


# --- live properties: echo, labels, non-finite JSON ------------------------------------------

LIVE = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def sync_channel(stack: tuple[Proc, Proc]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack[0].address) as channel:
        yield channel


def status_of(channel: grpc.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        channel.unary_unary(method)(data, timeout=10)
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def unknown_model_calls(name: str) -> list[tuple[str, bytes]]:
    predict = inference_pb2.PredictRequest(model=name)
    predict.json_inputs.update({"x": [1.0]})
    tf = predict_pb2.PredictRequest()
    tf.model_spec.name = name
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = name
    return [
        ("/modelmux.v1.Inference/Predict", predict.SerializeToString()),
        ("/modelmux.v1.Models/GetModel", models_pb2.GetModelRequest(name=name).SerializeToString()),
        (
            "/modelmux.v1.Models/SetVersionLabel",
            models_pb2.SetVersionLabelRequest(model=name, label="x").SerializeToString(),
        ),
        ("/tensorflow.serving.PredictionService/Predict", tf.SerializeToString()),
        ("/tensorflow.serving.ModelService/GetModelStatus", status.SerializeToString()),
    ]


def test_a_1_mb_model_name_gets_not_found_everywhere(sync_channel: grpc.Channel) -> None:
    for method, data in unknown_model_calls("m" * 1_000_000):
        code, details = status_of(sync_channel, method, data)
        assert code == grpc.StatusCode.NOT_FOUND, (method, code, details[:200])
        assert "(1000000 characters)" in details and len(details) < 1000, (method, details[:300])
    invoke = inference_pb2.InvokeRequest(api="a" * 1_000_000).SerializeToString()
    code, details = status_of(sync_channel, "/modelmux.v1.Inference/Invoke", invoke)
    assert code == grpc.StatusCode.NOT_FOUND and len(details) < 1000, (code, details[:300])


@LIVE
@given(name=st.text(min_size=1, max_size=3000).filter(lambda n: n not in ("half_plus_two", "iris")))
def test_unknown_model_names_get_not_found_with_bounded_details(
    sync_channel: grpc.Channel, name: str
) -> None:
    for method, data in unknown_model_calls(name):
        code, details = status_of(sync_channel, method, data)
        assert code == grpc.StatusCode.NOT_FOUND, (method, code, details[:200])
        assert len(details) < 1000


@LIVE
@given(
    label=st.one_of(st.text(max_size=300), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,140}\Z"))
)
def test_set_version_label_takes_exactly_the_names_the_config_takes(
    sync_channel: grpc.Channel, label: str
) -> None:
    request = models_pb2.SetVersionLabelRequest(model="iris", label=label, version=1)
    code, details = status_of(
        sync_channel, "/modelmux.v1.Models/SetVersionLabel", request.SerializeToString()
    )
    if NAME_RE.match(label):
        assert code == grpc.StatusCode.OK, details
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:200])
        assert len(details) < 1000


@LIVE
@given(values=st.lists(st.floats(width=32), min_size=1, max_size=8))
def test_json_predict_round_trips_nan_and_infinity(
    sync_channel: grpc.Channel, values: list[float]
) -> None:
    """half_plus_two v1 computes 0.5 x + 2 in float32; NaN and ±Infinity go in and come out as
    the strings protobuf's JSON mapping uses, never INTERNAL."""
    request = inference_pb2.PredictRequest(model="half_plus_two", version_label="stable")
    request.json_inputs.update({"x": [as_json(v) for v in values]})
    reply = inference_pb2.PredictResponse.FromString(
        sync_channel.unary_unary("/modelmux.v1.Inference/Predict")(
            request.SerializeToString(), timeout=10
        )
    )
    expected = (np.asarray(values, dtype="<f4") * np.float32(0.5) + np.float32(2)).tolist()
    got = json_format.MessageToDict(reply.json_outputs)["y"]  # JSON: it must serialize
    assert got == [as_json(v) for v in expected]
    json.dumps(got, allow_nan=False)


def test_a_dtype_error_names_the_callers_dtypes(sync_channel: grpc.Channel) -> None:
    x = np.asarray([1, 2], dtype="<i4")
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT32, shape=[2], content=x.tobytes())
    request = inference_pb2.PredictRequest(model="half_plus_two", inputs={"x": tensor})
    code, details = status_of(
        sync_channel, "/modelmux.v1.Inference/Predict", request.SerializeToString()
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "DATA_TYPE_FLOAT32" in details and "DATA_TYPE_INT32" in details and "DT_" not in details


BACKEND_METHODS = [
    f"/tensorflow.serving.PredictionService/{m}"
    for m in ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")
] + [
    "/tensorflow.serving.ModelService/GetModelStatus",
    "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
]


def test_the_backend_answers_invalid_argument_to_bytes_that_do_not_parse(backend: Proc) -> None:
    """As TF Serving does; it answered UNKNOWN ("Unexpected <class DecodeError>")."""
    with grpc.insecure_channel(backend.address) as channel:
        for method in BACKEND_METHODS:
            for data in (b"\x0a\x05abc", b"\x12\xff\xff\xff\xff\x0f", b"\x80"):
                code, details = status_of(channel, method, data)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
                assert "request is not a valid tensorflow.serving." in details, details

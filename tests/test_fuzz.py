"""Hostile clients against real gateway and modelsync processes, on loopback: a bounded fuzz of every
method (random bytes and mutated valid messages), and live property tests of echo, labels and
non-finite JSON. No call may get INTERNAL or UNKNOWN, stall, or leave the gateway bigger."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from conftest import Proc, start_daemon
from gateway_helpers import wait_serving, write_config
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.test_tensors import as_json

from gateway.errors import STATUS_LIMIT
from modelmux.modelsync.v1 import modelsync_pb2
from modelmux.v1 import inference_pb2, models_pb2, tensor_pb2
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

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MUTANTS = 25  # per seed message
FUZZ_SECONDS = 90.0  # the whole fuzz stops by then, whatever is left


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, example_models: Path, backend: Proc
) -> Iterator[tuple[Proc, Proc]]:
    """A gateway (reading the example models' folders) and a modelsync mirroring the same ones."""
    root = tmp_path_factory.mktemp("fuzz")
    config = write_config(
        root / "modelmux.yaml",
        models=example_models,
        backends=[{"name": "cpu-0", "address": backend.address}],
        gateway={"log_requests": False},
    )
    doc = yaml.safe_load(config.read_text())
    doc["modelsync"] = {"listen": "127.0.0.1:0", "target": str(root / "volume"), "settle": "0s"}
    config.write_text(yaml.safe_dump(doc))
    gateway = start_daemon(["gateway", "--config", str(config)], timeout=60)
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


# --- seeds: one valid message per method ------------------------------------------------------


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


def invoke() -> bytes:
    request = inference_pb2.InvokeRequest(api="half-plus-two", query_params={"a": "b"})
    json_format.ParseDict({"x": [1, 2]}, request.json)
    return request.SerializeToString()


def reflection(name: str) -> bytes:
    return reflection_pb2.ServerReflectionRequest(file_containing_symbol=name).SerializeToString()


GATEWAY_METHODS: list[tuple[str, str, list[bytes]]] = [
    ("/modelmux.v1.Inference/Predict", "unary", [typed_predict(), json_predict()]),
    ("/modelmux.v1.Inference/Invoke", "unary", [invoke()]),
    ("/modelmux.v1.Models/ListModels", "unary", [models_pb2.ListModelsRequest().SerializeToString()]),
    ("/modelmux.v1.Models/GetModel", "unary", [models_pb2.GetModelRequest(name="iris").SerializeToString()]),
    (
        "/modelmux.v1.Models/SetVersionLabel", "unary",
        [models_pb2.SetVersionLabelRequest(model="half_plus_two", label="fuzz", version=1).SerializeToString()],
    ),
    (
        "/modelmux.v1.Models/SetTrafficSplit", "unary",
        [models_pb2.SetTrafficSplitRequest(model="iris", weights={1: 1}).SerializeToString()],
    ),
    ("/modelmux.v1.Models/WatchModels", "stream", [models_pb2.WatchModelsRequest(models=["iris"]).SerializeToString()]),
    ("/tensorflow.serving.PredictionService/Predict", "unary", [tf_predict()]),
    ("/tensorflow.serving.PredictionService/Classify", "unary", [classify()]),
    ("/tensorflow.serving.PredictionService/Regress", "unary", [regress()]),
    ("/tensorflow.serving.PredictionService/MultiInference", "unary", [multi_inference()]),
    (
        "/tensorflow.serving.PredictionService/GetModelMetadata", "unary",
        [tf_spec(get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])).SerializeToString()],
    ),
    (
        "/tensorflow.serving.ModelService/GetModelStatus", "unary",
        [tf_spec(get_model_status_pb2.GetModelStatusRequest()).SerializeToString()],
    ),
    (
        "/tensorflow.serving.ModelService/HandleReloadConfigRequest", "unary",
        [model_management_pb2.ReloadConfigRequest().SerializeToString()],
    ),
    ("/grpc.health.v1.Health/Check", "unary", [health_pb2.HealthCheckRequest(service="").SerializeToString()]),
    ("/grpc.health.v1.Health/Watch", "stream", [health_pb2.HealthCheckRequest().SerializeToString()]),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi",
        [reflection("modelmux.v1.Inference"), reflection_pb2.ServerReflectionRequest(list_services="*").SerializeToString()],
    ),
]  # fmt: skip

MODELSYNC_METHODS: list[tuple[str, str, list[bytes]]] = [
    ("/modelmux.modelsync.v1.ModelSync/ListModels", "unary", [modelsync_pb2.ListModelsRequest().SerializeToString()]),
    (
        "/modelmux.modelsync.v1.ModelSync/WatchEvents", "stream",
        [modelsync_pb2.WatchEventsRequest(from_revision=1).SerializeToString()],
    ),
    ("/grpc.health.v1.Health/Check", "unary", [health_pb2.HealthCheckRequest().SerializeToString()]),
    ("/grpc.health.v1.Health/Watch", "stream", [health_pb2.HealthCheckRequest().SerializeToString()]),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi",
        [reflection("modelmux.modelsync.v1.ModelSync")],
    ),
]  # fmt: skip


def mutants(seed: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    """Random bytes, and ``seed`` with bytes flipped, cut, inserted, repeated or appended."""
    for i in range(count):
        data = bytearray(seed)
        kind = i % 7
        if kind == 0 or not data:
            yield rng.randbytes(rng.randrange(0, 64))
            continue
        at = rng.randrange(len(data))
        if kind == 1:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 2:
            del data[at:]
        elif kind == 3:
            data[at:at] = rng.randbytes(rng.randrange(1, 6))
        elif kind == 4:
            data = data * rng.randrange(2, 5)
        elif kind == 5:
            data[at] = rng.randrange(256)
            data[rng.randrange(len(data))] = rng.randrange(256)
        else:  # a field of a random number and wire type at the end
            data += bytes([rng.randrange(8, 256), rng.randrange(0, 128)]) + rng.randbytes(4)
        yield bytes(data)


async def one_call(channel: grpc.aio.Channel, method: str, kind: str, data: bytes) -> str:
    """The status code name of one call (a stream: of its first message, or of its end), or
    what went wrong (INTERNAL, UNKNOWN, a unary call past its deadline)."""
    try:
        if kind == "unary":
            await channel.unary_unary(method)(data, timeout=10)
            return "OK"
        if kind == "stream":
            call = channel.unary_stream(method)(data, timeout=2)
        else:

            async def requests() -> AsyncIterator[bytes]:
                yield data

            call = channel.stream_stream(method)(requests(), timeout=2)
        try:
            async for _ in call:
                return "OK"  # a valid watch goes on for ever: its first message is enough
            return "OK"
        finally:
            call.cancel()
    except grpc.aio.AioRpcError as exc:
        stalled = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and kind == "unary"
        if exc.code() in FORBIDDEN or stalled:  # (a watch of nothing may wait: not a stall)
            return f"{exc.code().name}: {method} {data.hex()[:120]}: {(exc.details() or '')[:200]}"
        assert len(exc.details() or "") <= STATUS_LIMIT + 100, (method, len(exc.details() or ""))
        return exc.code().name


async def test_fuzz_every_method_of_the_gateway_and_modelsync(stack: tuple[Proc, Proc]) -> None:
    gateway, sync = stack
    rng = random.Random(19)
    targets = [(gateway.address, m) for m in GATEWAY_METHODS] + [
        (sync.address, m) for m in MODELSYNC_METHODS
    ]
    codes: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    worst_health = 0.0
    done = asyncio.Event()

    async def probe() -> None:  # the gateway keeps answering quickly all along
        nonlocal worst_health
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            while not done.is_set():
                started = time.perf_counter()
                await check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=10)
                worst_health = max(worst_health, time.perf_counter() - started)
                await asyncio.sleep(0.02)

    channels = {addr: grpc.aio.insecure_channel(addr) for addr in (gateway.address, sync.address)}
    try:
        # warm up (every seed once), then measure memory before the mutants
        for address, (method, kind, seeds) in targets:
            for seed in seeds:
                await one_call(channels[address], method, kind, seed)
        before = rss_mb(gateway.pid)
        prober = asyncio.create_task(probe())
        deadline = time.monotonic() + FUZZ_SECONDS
        for round_ in range(2):  # the same mutants twice: memory must not grow with repeats
            rng.seed(19)
            for address, (method, kind, seeds) in targets:
                for seed in seeds:
                    batch = list(mutants(seed, rng, MUTANTS))
                    results = await asyncio.gather(
                        *(one_call(channels[address], method, kind, d) for d in batch)
                    )
                    for result in results:
                        if ":" in result:
                            bad.append(result)
                        else:
                            codes[result] += 1
                    assert time.monotonic() < deadline, "the fuzz ran out of time"
            if round_ == 0:
                after_one = rss_mb(gateway.pid)
        after = rss_mb(gateway.pid)
        done.set()
        await prober
    finally:
        done.set()
        for channel in channels.values():
            await channel.close()
    print(dict(codes), f"worst health check {worst_health * 1000:.1f} ms")
    print(f"gateway RSS {before:.1f} MB -> {after_one:.1f} MB -> {after:.1f} MB")
    assert not bad, "\n".join(bad[:20])
    assert sum(codes.values()) > 500 and codes["INVALID_ARGUMENT"] > 100, codes
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

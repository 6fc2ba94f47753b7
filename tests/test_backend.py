"""The embedded backend, end to end: real SavedModels, real subprocesses, real gRPC on loopback."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from backend_helpers import (
    Model,
    config_text,
    floats,
    predict_request,
    publish_version,
    reload_request,
    retract_version,
    spec,
    to_numpy,
    version_states,
    wait_for_states,
    wait_until,
)
from conftest import Proc, start_daemon
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backend.server import Settings
from backend.services import Device
from backend.tfserving import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
    tensor_pb2,
    types_pb2,
)
from modelmux_common.config import ConfigError

X = [1.0, 2.0, 5.0]
V1_Y = [2.5, 3.0, 4.5]
V2_Y = [3.5, 4.0, 5.5]
IRIS = {  # sepal_length, sepal_width, petal_length, petal_width of setosa, versicolor, virginica
    "sepal_length": [5.1, 5.9, 6.9],
    "sepal_width": [3.5, 3.0, 3.1],
    "petal_length": [1.4, 4.2, 5.4],
    "petal_width": [0.2, 1.5, 2.1],
}
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


@pytest.fixture(scope="module")
def daemons(example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Proc]]:
    """A cpu backend (fast polling) and an inferentia backend with a start-up model config."""
    config = tmp_path_factory.mktemp("inf") / "models.pbtxt"
    config.write_text(
        config_text(
            [
                Model("half_plus_two", example_models / "half_plus_two"),
                Model("half_plus_two_inf", example_models / "half_plus_two_inf"),
            ]
        )
    )
    base = ["backend", "--listen", "127.0.0.1:0"]
    commands = [
        [*base, "--accelerator", "cpu", "--poll-interval", "100ms"],
        [*base, "--accelerator", "inferentia", "--model-config-file", str(config)],
    ]
    before = set(threading.enumerate())
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = [pool.submit(start_daemon, command) for command in commands]
    procs = [f.result() for f in futures if f.exception() is None]
    drains = [t for t in set(threading.enumerate()) - before if "drain" in t.name]
    try:
        if len(procs) != len(commands):
            raise next(e for f in futures if (e := f.exception()) is not None)
        yield procs
        # SIGTERM must drain and exit 0.
        assert [proc.stop() for proc in procs] == [0] * len(procs)
    finally:
        _stop_and_close(procs, drains)


def _stop_and_close(procs: list[Proc], drains: list[threading.Thread]) -> None:
    """Stops the daemons and closes their log pipes once start_daemon's readers hit EOF."""
    for proc in procs:
        proc.stop()
    for thread in drains:
        thread.join(timeout=10)
    for proc in procs:
        if proc.popen.stderr is not None:
            proc.popen.stderr.close()


@pytest_asyncio.fixture(scope="module")
async def cpu(daemons: list[Proc]) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(daemons[0].address) as channel:
        yield Stubs(channel)


@pytest_asyncio.fixture(scope="module")
async def inf(daemons: list[Proc]) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(daemons[1].address) as channel:
        yield Stubs(channel)


def standard(example_models: Path, *, labels: tuple[tuple[str, int], ...] = ()) -> list[Model]:
    return [
        Model("half_plus_two", example_models / "half_plus_two", "all {}", labels),
        Model("iris", example_models / "iris"),
        Model("half_plus_two_inf", example_models / "half_plus_two_inf"),
    ]


@pytest_asyncio.fixture
async def loaded(cpu: Stubs, example_models: Path) -> Stubs:
    """The cpu backend with the standard config (half_plus_two v1+v2 labelled, iris, inf)."""
    await cpu.models.HandleReloadConfigRequest(reload_request(standard(example_models)), timeout=60)
    await wait_for_states(cpu.models, "half_plus_two", {1: "AVAILABLE", 2: "AVAILABLE"})
    labelled = standard(example_models, labels=(("stable", 1), ("canary", 2)))
    await cpu.models.HandleReloadConfigRequest(reload_request(labelled), timeout=60)
    return cpu


async def predict_y(stubs: Stubs, request: predict_pb2.PredictRequest) -> tuple[list[float], int]:
    response = await stubs.predict.Predict(request, timeout=10)
    return to_numpy(response.outputs["y"]).tolist(), response.model_spec.version.value


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


# -- lifecycle ---------------------------------------------------------------------------------


async def test_serving_line_and_health(daemons: list[Proc], cpu: Stubs) -> None:
    serving = [line for line in daemons[1].lines if line.get("event") == "serving"]
    assert serving and serving[0]["accelerator"] == "inferentia"
    assert serving[0]["address"] == daemons[1].address
    check = await cpu.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_reload_config_makes_every_version_available(loaded: Stubs) -> None:
    await wait_for_states(loaded.models, "half_plus_two", {1: "AVAILABLE", 2: "AVAILABLE"})
    await wait_for_states(loaded.models, "iris", {1: "AVAILABLE"})
    await wait_for_states(loaded.models, "half_plus_two_inf", {1: "AVAILABLE"})
    one = get_model_status_pb2.GetModelStatusRequest(model_spec=spec("half_plus_two", version=2))
    status = await loaded.models.GetModelStatus(one, timeout=5)
    assert [(s.version, s.status.error_code) for s in status.model_version_status] == [(2, 0)]


async def test_full_replace_unloads_absent_models(loaded: Stubs, example_models: Path) -> None:
    only_iris = [Model("iris", example_models / "iris")]
    await loaded.models.HandleReloadConfigRequest(reload_request(only_iris), timeout=60)
    await wait_for_states(loaded.models, "half_plus_two", {1: "END", 2: "END"})
    error = await rpc_error(
        loaded.predict.Predict(predict_request(spec("half_plus_two"), x=floats(X)))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'half_plus_two' not found" in (error.details() or "")
    await wait_for_states(loaded.models, "iris", {1: "AVAILABLE"})


async def test_new_version_folders_are_picked_up(
    cpu: Stubs, example_models: Path, tmp_path: Path
) -> None:
    source = example_models / "half_plus_two"
    specific, latest = tmp_path / "specific", tmp_path / "latest"
    for base in (specific, latest):
        base.mkdir()
        publish_version(source / "1", base, 1)
    models = [
        Model("hp_specific", specific, "specific { versions: 1 versions: 2 }"),
        Model("hp_latest", latest, "latest { num_versions: 1 }"),
    ]
    await cpu.models.HandleReloadConfigRequest(reload_request(models), timeout=60)
    assert await version_states(cpu.models, "hp_specific") == {1: "AVAILABLE"}
    assert await version_states(cpu.models, "hp_latest") == {1: "AVAILABLE"}
    for base in (specific, latest):
        publish_version(source / "2", base, 2)
    await wait_for_states(cpu.models, "hp_specific", {1: "AVAILABLE", 2: "AVAILABLE"})
    await wait_for_states(cpu.models, "hp_latest", {1: "END", 2: "AVAILABLE"})
    assert await predict_y(cpu, predict_request(spec("hp_latest"), x=floats(X))) == (V2_Y, 2)
    # A folder that disappears is unloaded; under latest 1 the previous version comes back.
    retract_version(latest, 2)
    await wait_for_states(cpu.models, "hp_latest", {1: "AVAILABLE", 2: "END"})
    assert await predict_y(cpu, predict_request(spec("hp_latest"), x=floats(X))) == (V1_Y, 1)


# -- prediction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"version": 1}, (V1_Y, 1)),
        ({"version": 2}, (V2_Y, 2)),
        ({"label": "stable"}, (V1_Y, 1)),
        ({"label": "canary"}, (V2_Y, 2)),
        ({}, (V2_Y, 2)),
    ],
)
async def test_predict_by_version_label_and_latest(
    loaded: Stubs, choice: dict[str, object], expected: tuple[list[float], int]
) -> None:
    request = predict_request(spec("half_plus_two", **choice), x=floats(X))  # type: ignore[arg-type]
    response = await loaded.predict.Predict(request, timeout=10)
    assert (to_numpy(response.outputs["y"]).tolist(), response.model_spec.version.value) == expected
    assert response.model_spec.name == "half_plus_two"
    assert response.model_spec.signature_name == "serving_default"


async def test_iris_classifies_the_three_classic_samples(loaded: Stubs) -> None:
    inputs = {name: floats(values) for name, values in IRIS.items()}
    response = await loaded.predict.Predict(predict_request(spec("iris"), **inputs), timeout=10)
    assert to_numpy(response.outputs["class_ids"]).tolist() == [[0], [1], [2]]
    probabilities = to_numpy(response.outputs["probabilities"])
    assert probabilities.shape == (3, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


async def test_output_filter(loaded: Stubs) -> None:
    request = predict_request(spec("iris"), **{n: floats(v) for n, v in IRIS.items()})
    request.output_filter.append("class_ids")
    response = await loaded.predict.Predict(request, timeout=10)
    assert list(response.outputs) == ["class_ids"]


def _strings() -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"a"])
    proto.tensor_shape.dim.add(size=1)
    return proto


def _bad_content() -> tensor_pb2.TensorProto:
    proto = floats([], shape=[3])
    proto.tensor_content = b"\x00" * 5
    return proto


BAD_PREDICTS = [
    ("unknown model", spec("nope"), {"x": floats(X)}, (), "NOT_FOUND", "model 'nope' not found"),
    (
        "unknown version",
        spec("half_plus_two", version=7),
        {"x": floats(X)},
        (),
        "NOT_FOUND",
        "model 'half_plus_two' has no version 7; available: 1, 2",
    ),
    (
        "unknown label",
        spec("half_plus_two", label="gold"),
        {"x": floats(X)},
        (),
        "NOT_FOUND",
        "model 'half_plus_two' has no version label 'gold'; labels: canary, stable",
    ),
    (
        "unknown signature",
        spec("half_plus_two", signature="nope"),
        {"x": floats(X)},
        (),
        "INVALID_ARGUMENT",
        "has no signature 'nope'; available: serving_default",
    ),
    (
        "missing input",
        spec("half_plus_two"),
        {},
        (),
        "INVALID_ARGUMENT",
        "input 'x' is missing; signature 'serving_default' expects: x",
    ),
    (
        "unknown input",
        spec("half_plus_two"),
        {"x": floats(X), "z": floats(X)},
        (),
        "INVALID_ARGUMENT",
        "input 'z' is not an input of signature 'serving_default'; expected inputs: x",
    ),
    (
        "wrong dtype",
        spec("half_plus_two"),
        {"x": _strings()},
        (),
        "INVALID_ARGUMENT",
        "input 'x': expected dtype DT_FLOAT, got DT_STRING",
    ),
    (
        "wrong shape",
        spec("half_plus_two"),
        {"x": floats([1, 2, 3, 4], shape=[2, 2])},
        (),
        "INVALID_ARGUMENT",
        "input 'x': expected shape [-1], got [2,2]",
    ),
    (
        "undecodable content",
        spec("half_plus_two"),
        {"x": _bad_content()},
        (),
        "INVALID_ARGUMENT",
        "input 'x': cannot decode the tensor",
    ),
    (
        "shape larger than its payload",
        spec("half_plus_two"),
        {"x": floats([1.0], shape=[1_000_000_000])},
        (),
        "INVALID_ARGUMENT",
        "declares 1000000000 elements",
    ),
    (
        "unknown output filter",
        spec("half_plus_two"),
        {"x": floats(X)},
        ("nope",),
        "INVALID_ARGUMENT",
        "output_filter 'nope' is not an output of signature 'serving_default'; outputs: y",
    ),
]


@pytest.mark.parametrize(
    ("model", "inputs", "output_filter", "code", "message"),
    [case[1:] for case in BAD_PREDICTS],
    ids=[case[0] for case in BAD_PREDICTS],
)
async def test_bad_predict_requests(
    loaded: Stubs,
    model: object,
    inputs: dict[str, tensor_pb2.TensorProto],
    output_filter: tuple[str, ...],
    code: str,
    message: str,
) -> None:
    request = predict_request(model, **inputs)  # type: ignore[arg-type]
    request.output_filter.extend(output_filter)
    error = await rpc_error(loaded.predict.Predict(request, timeout=10))
    assert error.code() == getattr(grpc.StatusCode, code)
    assert message in (error.details() or "")


async def test_iris_inputs_of_different_lengths_are_invalid(loaded: Stubs) -> None:
    inputs = {name: floats(values) for name, values in IRIS.items()}
    inputs["petal_width"] = floats([0.2])
    error = await rpc_error(loaded.predict.Predict(predict_request(spec("iris"), **inputs)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'iris' version 1 signature 'serving_default'" in (error.details() or "")


# -- status, metadata, config errors -----------------------------------------------------------


async def test_status_of_unknown_model_and_version(loaded: Stubs) -> None:
    for model, text in [
        (spec("nope"), "model 'nope' not found"),
        (spec("iris", version=9), "model 'iris' has no version 9; versions: 1"),
    ]:
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=model)
        error = await rpc_error(loaded.models.GetModelStatus(request, timeout=5))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert text in (error.details() or "")


async def test_metadata_reports_signature_dtypes(loaded: Stubs) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=spec("iris"), metadata_field=["signature_def"]
    )
    response = await loaded.predict.GetModelMetadata(request, timeout=5)
    assert (response.model_spec.name, response.model_spec.version.value) == ("iris", 1)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert list(signatures.signature_def) == ["serving_default"]
    sigdef = signatures.signature_def["serving_default"]
    assert sigdef.method_name == "tensorflow/serving/predict"
    assert {n: i.dtype for n, i in sigdef.inputs.items()} == dict.fromkeys(IRIS, types_pb2.DT_FLOAT)
    assert sigdef.outputs["class_ids"].dtype == types_pb2.DT_INT64
    assert [d.size for d in sigdef.outputs["probabilities"].tensor_shape.dim] == [-1, 3]
    request.metadata_field[:] = ["nope"]
    error = await rpc_error(loaded.predict.GetModelMetadata(request, timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


BAD_CONFIGS = [
    ("missing base_path", [Model("a", "")], "config[0] (model 'a'): base_path is empty"),
    (
        "duplicate names",
        [Model("a", "/m/a"), Model("a", "/m/b")],
        "config[1]: duplicate model name 'a' (also config[0])",
    ),
    (
        "platform",
        [Model("a", "/m/a", extra='model_platform: "pytorch"')],
        "model_platform 'pytorch' is not supported",
    ),
]


@pytest.mark.parametrize(
    ("models", "message"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
async def test_bad_config_is_rejected_and_changes_nothing(
    loaded: Stubs, models: list[Model], message: str
) -> None:
    error = await rpc_error(loaded.models.HandleReloadConfigRequest(reload_request(models)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")
    assert await predict_y(loaded, predict_request(spec("half_plus_two"), x=floats(X))) == (V2_Y, 2)


async def test_custom_model_config_is_rejected(loaded: Stubs) -> None:
    request = model_management_pb2.ReloadConfigRequest()
    request.config.custom_model_config.type_url = "type.googleapis.com/x.Custom"
    error = await rpc_error(loaded.models.HandleReloadConfigRequest(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "custom_model_config is not supported" in (error.details() or "")


async def test_label_on_unavailable_version_fails_precondition(
    loaded: Stubs, example_models: Path
) -> None:
    models = standard(example_models, labels=(("stable", 1), ("broken", 9)))
    error = await rpc_error(loaded.models.HandleReloadConfigRequest(reload_request(models)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert "'broken'" in details and "'half_plus_two'" in details and "version 9" in details


# -- classify / regress ------------------------------------------------------------------------


def _example_input(target: object, xs: list[float]) -> None:
    for x in xs:
        example = target.input.example_list.examples.add()  # type: ignore[attr-defined]
        example.features.feature["x"].float_list.value.append(x)


async def test_classify_regress_and_multi_inference(loaded: Stubs) -> None:
    regress = regression_pb2.RegressionRequest(
        model_spec=spec("half_plus_two_inf", signature="regress_x_to_y")
    )
    _example_input(regress, X)
    response = await loaded.predict.Regress(regress, timeout=10)
    assert [r.value for r in response.result.regressions] == V1_Y
    classify = classification_pb2.ClassificationRequest(
        model_spec=spec("half_plus_two_inf", signature="classify_x_to_y")
    )
    _example_input(classify, [4.0])
    result = (await loaded.predict.Classify(classify, timeout=10)).result
    assert [[c.score for c in row.classes] for row in result.classifications] == [[4.0]]
    multi = inference_pb2.MultiInferenceRequest()
    multi.tasks.add(model_spec=classify.model_spec, method_name="tensorflow/serving/classify")
    multi.tasks.add(model_spec=regress.model_spec, method_name="tensorflow/serving/regress")
    _example_input(multi, [0.0])
    results = (await loaded.predict.MultiInference(multi, timeout=10)).results
    assert results[0].classification_result.classifications[0].classes[0].score == 2.0
    assert results[1].regression_result.regressions[0].value == 2.0


async def test_classify_on_a_predict_signature_is_invalid(loaded: Stubs) -> None:
    request = classification_pb2.ClassificationRequest(model_spec=spec("half_plus_two_inf"))
    _example_input(request, [1.0])
    error = await rpc_error(loaded.predict.Classify(request, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a classification signature" in (error.details() or "")


# -- inferentia --------------------------------------------------------------------------------


async def test_inferentia_backend_refuses_models_with_variables(
    inf: Stubs, daemons: list[Proc]
) -> None:
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec("half_plus_two"))
    status = (await inf.models.GetModelStatus(request, timeout=5)).model_version_status
    end = get_model_status_pb2.ModelVersionStatus.END
    assert [(s.version, s.state, s.status.error_code) for s in status] == [
        (2, end, FAILED_PRECONDITION)
    ]
    assert "variables/" in status[0].status.error_message

    def failed() -> list[dict[str, object]]:
        # the log line is read by another thread: wait for it rather than race it
        return [line for line in daemons[1].lines if line.get("event") == "version load failed"]

    async def logged() -> bool:
        return bool(failed())

    await wait_until(logged, timeout=10, what="the load failure log line")
    assert failed()[0]["model"] == "half_plus_two" and "variables/" in str(failed()[0]["error"])
    assert await predict_y(inf, predict_request(spec("half_plus_two_inf"), x=floats(X))) == (
        V1_Y,
        1,
    )
    error = await rpc_error(
        inf.predict.Predict(predict_request(spec("half_plus_two"), x=floats(X)))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_make_models_layouts(example_models: Path) -> None:
    assert (example_models / "half_plus_two" / "1" / "variables" / "variables.index").is_file()
    inferentia = example_models / "half_plus_two_inf" / "1"
    assert sorted(p.name for p in inferentia.iterdir()) == ["saved_model.pb"]


def test_device_stand_in_settings() -> None:
    """--device-time / --device-slots (the bench's bottleneck scenario) and their bad values."""

    def settings(**flags: object) -> Settings:
        return Settings.from_args(argparse.Namespace(**flags))

    device = settings(device_time="20ms", device_slots=2).device
    assert device is not None and device.seconds == pytest.approx(0.02) and device.slots == 2
    assert settings(device_time="0s", device_slots=1).device is None
    with pytest.raises(ConfigError, match="--device-slots: must be at least 1, not 0"):
        settings(device_time="10ms", device_slots=0)
    with pytest.raises(ConfigError, match="--device-time"):
        settings(device_time="soon", device_slots=1)


async def test_device_stand_in_holds_one_slot_per_predict() -> None:
    device = Device(0.05, slots=1)
    started = time.monotonic()
    await asyncio.gather(*(device.run() for _ in range(3)))
    assert time.monotonic() - started >= 0.15  # one slot: the three calls took turns

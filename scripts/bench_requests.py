"""The requests a benchmark run sends, serialized once up front, and checks of the answers.

Four request forms reach ``half_plus_two`` (``y = 0.5 x + 2`` in version 1, ``+ 3`` in version 2):
TF Serving's PredictRequest (``tf``: what a TF Serving client sends, the tensor packed in
``tensor_content`` as ``tf.make_tensor_proto`` does for arrays), the gateway's own API with a typed
tensor (``typed``) and with JSON (``json``), and ``modelmux.v1.Inference/Invoke`` of the API's
handler (``invoke``: scripts/bench_handler.py, JSON ``{"x": [...]}`` in, ``{"y": [...],
"version": N}`` out; the handler always asks for latest).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format

from modelmux.v1 import inference_pb2, tensor_pb2
from modelmux_common.tfserving import predict_pb2, types_pb2

MODEL = "half_plus_two"
API = "half-plus-two"  # the API name of every gateway config (bench_stack.API)
OFFSET = {1: 2.0, 2: 3.0}
LATEST = 2
METHODS = {
    "tf": "/tensorflow.serving.PredictionService/Predict",
    "typed": "/modelmux.v1.Inference/Predict",
    "json": "/modelmux.v1.Inference/Predict",
    "invoke": "/modelmux.v1.Inference/Invoke",
}
SMALL = np.array([1.0, 2.0, 5.0], dtype="<f4")


def values(count: int) -> np.ndarray[Any, Any]:
    """``count`` float32 values (the large tensor is ``values(10_000_000)``: 40 MB)."""
    if count == len(SMALL):
        return SMALL
    return np.linspace(-1.0, 1.0, count, dtype="<f4")


def build(kind: str, x: np.ndarray[Any, Any], version: int | None) -> bytes:
    """The serialized request of ``kind`` (tf, typed, json or invoke); ``version`` None means
    latest (the only choice for invoke: the handler does not pass a version on)."""
    if kind == "tf":
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        if version is not None:
            request.model_spec.version.value = version
        tensor = request.inputs["x"]
        tensor.dtype = types_pb2.DT_FLOAT
        tensor.tensor_shape.dim.add().size = len(x)
        tensor.tensor_content = x.tobytes()
        return bytes(request.SerializeToString())
    if kind == "invoke":
        if version is not None:
            raise ValueError("invoke: the bench handler always runs the latest version")
        invoke = inference_pb2.InvokeRequest(api=API)
        invoke.json.struct_value.update({"x": x.tolist()})
        return bytes(invoke.SerializeToString())
    own = inference_pb2.PredictRequest(model=MODEL)
    if version is not None:
        own.version = version
    if kind == "typed":
        own.inputs["x"].CopyFrom(
            tensor_pb2.Tensor(
                dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[len(x)], content=x.tobytes()
            )
        )
    elif kind == "json":
        own.json_inputs.update({"x": x.tolist()})
    else:
        raise ValueError(f"unknown request kind {kind!r}")
    return bytes(own.SerializeToString())


def _tf_values(tensor: Any) -> np.ndarray[Any, Any]:
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype="<f4")
    return np.array(tensor.float_val, dtype="<f4")


def answer(kind: str, raw: bytes) -> tuple[int, np.ndarray[Any, Any]]:
    """(version that ran, y) from a serialized response of ``kind``."""
    if kind == "tf":
        response = predict_pb2.PredictResponse.FromString(raw)
        return response.model_spec.version.value, _tf_values(response.outputs["y"])
    if kind == "invoke":
        result = json_format.MessageToDict(inference_pb2.InvokeResponse.FromString(raw).json)
        if not isinstance(result, dict) or "y" not in result or "version" not in result:
            raise AssertionError(f"invoke: unexpected handler result {str(result)[:200]}")
        return int(result["version"]), np.array(result["y"], dtype="<f4")
    own = inference_pb2.PredictResponse.FromString(raw)
    if kind == "typed":
        return own.version, np.frombuffer(own.outputs["y"].content, dtype="<f4")
    outputs = json_format.MessageToDict(own.json_outputs)
    return own.version, np.array(outputs["y"], dtype="<f4")


def check(kind: str, raw: bytes, x: np.ndarray[Any, Any], version: int) -> None:
    """Raises unless the response is ``0.5 x + offset`` computed by ``version``."""
    ran, y = answer(kind, raw)
    if ran != version:
        raise AssertionError(f"{kind}: expected version {version} to answer, got {ran}")
    if y.shape != x.shape or not np.allclose(y, 0.5 * x + OFFSET[version]):
        raise AssertionError(f"{kind}: wrong output for version {version}: {y[:5]}...")

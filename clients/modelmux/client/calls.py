"""The one implementation behind both faces: requests built and replies read the same way.

``Client`` (blocking) and ``AsyncClient`` (asyncio) differ only in how they wait for gRPC; every
request, every reply, every option and every error goes through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2

from modelmux.client.tensors import from_tensor, to_tensor
from modelmux.v1 import inference_pb2, models_pb2

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
Payload: TypeAlias = "JsonValue | bytes"
HealthStatus = Literal["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_HEALTH: dict[int, HealthStatus] = {
    health_pb2.HealthCheckResponse.SERVING: "SERVING",
    health_pb2.HealthCheckResponse.NOT_SERVING: "NOT_SERVING",
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: "SERVICE_UNKNOWN",
}


@dataclass(frozen=True, slots=True)
class Prediction:
    """What Predict answered: the outputs by name, and which version of which model ran."""

    model: str
    version: int
    signature_name: str
    outputs: dict[str, np.ndarray[Any, Any]]

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]


def predict_request(
    model: str,
    inputs: Mapping[str, npt.ArrayLike],
    *,
    version: int | None,
    label: str | None,
    signature: str,
    output_filter: tuple[str, ...],
) -> inference_pb2.PredictRequest:
    """A typed-tensor PredictRequest; latest when neither ``version`` nor ``label`` is given."""
    if version is not None and label is not None:
        raise ValueError("give version or label, not both")
    request = inference_pb2.PredictRequest(
        model=model,
        signature_name=signature,
        inputs={name: to_tensor(name, value) for name, value in inputs.items()},
        output_filter=output_filter,
    )
    if version is not None:
        request.version = version
    elif label is not None:
        request.version_label = label
    return request


def prediction(reply: inference_pb2.PredictResponse) -> Prediction:
    return Prediction(
        model=reply.model,
        version=reply.version,
        signature_name=reply.signature_name,
        outputs={name: from_tensor(name, t) for name, t in reply.outputs.items()},
    )


def invoke_request(
    api: str,
    payload: Payload,
    *,
    query_params: Mapping[str, str] | None,
    headers: Mapping[str, str] | None,
) -> inference_pb2.InvokeRequest:
    """``bytes`` go as the raw payload, anything else as JSON (``None``: no payload at all)."""
    request = inference_pb2.InvokeRequest(
        api=api, query_params=query_params or {}, headers=headers or {}
    )
    if isinstance(payload, bytes):
        request.raw = payload
    elif payload is not None:
        holder = struct_pb2.Struct()
        holder.update({"payload": payload})
        request.json.CopyFrom(holder.fields["payload"])
    return request


def invoke_result(reply: inference_pb2.InvokeResponse) -> Payload:
    """The handler's return value: bytes as bytes, JSON as Python values (numbers as float)."""
    kind = reply.WhichOneof("result")
    if kind == "raw":
        return reply.raw
    if kind == "json":
        return _json(reply.json)
    return None


def _json(value: struct_pb2.Value) -> JsonValue:
    result: JsonValue = json_format.MessageToDict(value)
    return result


def models(reply: models_pb2.ListModelsResponse) -> list[models_pb2.Model]:
    return list(reply.models)


def health_status(reply: health_pb2.HealthCheckResponse) -> HealthStatus:
    return _HEALTH.get(reply.status, "UNKNOWN")

"""The one implementation behind both faces: requests built and replies read the same way.

``Client`` (blocking) and ``AsyncClient`` (asyncio) differ only in how they wait for gRPC; every
request, every reply, every option and every error goes through here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2

from modelmux.client.tensors import from_tensor, to_tensor
from modelmux.v1 import async_pb2, inference_pb2, models_pb2

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


# -- async requests (modelmux.v1.Async) ------------------------------------------------------

AsyncState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "UNSPECIFIED"]
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED")


@dataclass(frozen=True, slots=True)
class AsyncRequest:
    """An async request as the gateway reports it; ``result`` once COMPLETED (JSON as Python
    values, bytes as bytes), ``error`` once FAILED. Times are epoch seconds, None when unset."""

    id: str
    api: str
    state: AsyncState
    attempts: int
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    result: Payload
    error: str

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


def new_request_id() -> str:
    """The id the client gives a Submit that names none, so that a retried Submit is the same
    request (the gateway's own ids have this form too: time-ordered hex)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def submit_request(
    api: str, payload: Payload, *, content_type: str, request_id: str | None
) -> async_pb2.SubmitRequest:
    """``bytes`` go raw with ``content_type``, anything else as JSON."""
    request = async_pb2.SubmitRequest(api=api, id=request_id or new_request_id())
    if isinstance(payload, bytes):
        request.raw = payload
        request.content_type = content_type
    else:
        holder = struct_pb2.Struct()
        holder.update({"payload": payload})
        request.json.CopyFrom(holder.fields["payload"])
    return request


def list_request(
    api: str, *, states: Sequence[str], page_size: int, page_token: str
) -> async_pb2.ListRequest:
    numbers = [async_pb2.AsyncState.Value(f"ASYNC_STATE_{s}") for s in states]
    return async_pb2.ListRequest(
        api=api, states=numbers, page_size=page_size, page_token=page_token
    )


def async_request(message: async_pb2.AsyncRequest) -> AsyncRequest:
    def when(name: str) -> float | None:
        return (
            message.__getattribute__(name).ToNanoseconds() / 1e9
            if message.HasField(
                name  # type: ignore[arg-type]
            )
            else None
        )

    kind = message.WhichOneof("result")
    result: Payload = (
        message.raw if kind == "raw" else _json(message.json) if kind == "json" else None
    )
    state = async_pb2.AsyncState.Name(message.state).removeprefix("ASYNC_STATE_")
    return AsyncRequest(
        id=message.id,
        api=message.api,
        state=state,  # type: ignore[arg-type]
        attempts=message.attempts,
        submitted_at=when("submitted_at"),
        started_at=when("started_at"),
        finished_at=when("finished_at"),
        expires_at=when("expires_at"),
        result=result,
        error=message.error,
    )


def async_page(reply: async_pb2.ListResponse) -> tuple[list[AsyncRequest], str]:
    return [async_request(r) for r in reply.requests], reply.next_page_token

"""TF Serving's own gRPC API on the gateway, so existing TF Serving clients work unchanged.

Requests are routed by their model spec and forwarded as the bytes the client sent, with at most a
model spec appended (see :class:`gateway.forwarding.Forwarder`): tensors are never decoded.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gateway.edge import Call, Handler
from gateway.errors import InvalidArgument, NotFound, Unimplemented, parse, shown
from gateway.fleet.fleet import Fleet
from gateway.request import Send, resolve
from gateway.transport import AVAILABLE, VersionStatus
from gateway.wire import MAX_FIELDS, WireError, field_bytes
from modelmux_common.tfserving import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"

# request message of each forwarded method
_REQUEST = {
    "Predict": predict_pb2.PredictRequest,
    "Classify": classification_pb2.ClassificationRequest,
    "Regress": regression_pb2.RegressionRequest,
    "MultiInference": inference_pb2.MultiInferenceRequest,
    "GetModelMetadata": get_model_metadata_pb2.GetModelMetadataRequest,
}


# Requests up to this size are parsed whole by protobuf's C parser as a message holding only
# field 1 (the rest kept as unknown fields): cheaper than walking the wire in Python. Larger ones
# are walked, so their tensors are not copied.
_PARSE_WHOLE = 16 * 1024


def model_spec_of(method: str, data: bytes) -> tuple[Any, bool]:
    """The request's ModelSpec (MultiInference: the first task's), parsed without the tensors, and
    whether it was read from the request's first fields only: a request of more top-level fields
    than a walk reads (gateway.wire.MAX_FIELDS) is routed by the model spec among those, and its
    backend must be given the resolved spec (the rest may hold more of field 1, which a parser
    would merge)."""
    try:
        if method != "MultiInference" and len(data) <= _PARSE_WHOLE:
            # every other forwarded request has its model spec in field 1, as this message does
            partial = False
            spec = get_model_status_pb2.GetModelStatusRequest.FromString(data).model_spec
        else:
            spec, partial = _walk(method, data)
    except WireError as exc:
        raise InvalidArgument(f"request is not a valid {_name(method)}: {exc}") from None
    except DecodeError:
        raise InvalidArgument(
            f"request is not a valid {_name(method)}: the bytes do not parse"
        ) from None
    if not spec.name:
        raise InvalidArgument("model_spec.name is required")
    return spec, partial


def _walk(method: str, data: bytes) -> tuple[Any, bool]:
    if method == "MultiInference":
        task, whole = field_bytes(data, 1, first=True)
        raw, whole_task = field_bytes(task, 1)
        if not (whole and whole_task):  # every task is rewritten, so parsed, by the forwarder
            raise InvalidArgument(
                f"a {_name(method)} of more than {MAX_FIELDS} fields is not served"
            )
        return model_pb2.ModelSpec.FromString(raw), False
    raw, whole = field_bytes(data, 1)
    if not (whole or raw):
        raise InvalidArgument(
            f"request is not a valid {_name(method)}: no model_spec among its first "
            f"{MAX_FIELDS} fields"
        )
    return model_pb2.ModelSpec.FromString(raw), not whole


def _name(method: str) -> str:
    name: str = _REQUEST[method].DESCRIPTOR.full_name
    return name


class Facade:
    def __init__(self, fleet: Fleet, send: Send) -> None:
        self.fleet = fleet
        self.send = send  # the path below: admission, batching, forwarding

    def forwarding(self, method: str) -> Handler:
        async def handle(
            data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
        ) -> bytes:
            spec, partial = model_spec_of(method, data)
            choice = spec.WhichOneof("version_choice")
            version = spec.version.value if choice == "version" else None
            label = spec.version_label if choice == "version_label" else None
            call.model = spec.name
            request = resolve(
                self.fleet.table, method, data, model=spec.name, version=version, label=label,
                partial=partial,
            )  # fmt: skip
            try:
                return await self.send(request, context, call)
            except grpc.aio.AioRpcError as exc:
                # a backend that cannot say why (e.g. one that failed to decode the bytes): when
                # the request does not parse, the caller is told so, as the README promises
                if exc.code() == grpc.StatusCode.UNKNOWN:
                    parse(_REQUEST[method], data)
                raise

        return handle

    async def get_model_status(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        """The fleet's view: a version is AVAILABLE when any backend serves it."""
        request = parse(get_model_status_pb2.GetModelStatusRequest, data)
        name = request.model_spec.name
        call.model = name
        if name not in self.fleet.desired.models:
            status = self.fleet.table.states.get(name)
            if status is not None:  # known, nothing published: refused, source failing, pending
                raise status.error(name)
            raise NotFound(f"Could not find any versions of model {shown(name, quote=False)}")
        merged: dict[int, VersionStatus] = {}
        for version, entries in self.fleet.states(name).items():
            if entries:
                available = [st for _, st in entries if st.state == AVAILABLE]
                merged[version] = (
                    available[0] if available else max(entries, key=lambda e: e[1].state)[1]
                )
        if request.model_spec.HasField("version"):
            wanted = request.model_spec.version.value
            call.version = wanted
            if wanted not in merged:
                raise NotFound(f"Could not find version {wanted} of model {name}")
            merged = {wanted: merged[wanted]}
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in sorted(merged):
            entry = response.model_version_status.add(version=version, state=merged[version].state)
            if merged[version].error:
                entry.status.error_code = 2  # UNKNOWN, as TF Serving reports load failures
                entry.status.error_message = merged[version].error
        return bytes(response.SerializeToString())

    async def reload_config(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        raise Unimplemented(
            "the gateway manages its backends' model configuration; change the modelmux config instead"
        )

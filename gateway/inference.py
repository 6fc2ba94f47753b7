"""``modelmux.v1.Inference``: Predict with typed tensors or JSON, on any TF Serving backend."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.calls import Call, Forwarder
from gateway.errors import InvalidArgument, parse, shown
from gateway.tensors import (
    in_modelmux_names,
    json_to_proto,
    proto_to_json,
    proto_to_typed,
    struct_from,
    struct_values,
    typed_to_proto,
)
from modelmux.v1 import inference_pb2
from modelmux_common.tfserving import get_model_metadata_pb2, predict_pb2

DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    dtype: int
    # None for unknown rank; -1 for unknown dimensions
    shape: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


def check_input_names(names: Iterable[str], signature: Signature, signature_name: str) -> None:
    """INVALID_ARGUMENT for an input the signature does not have: one wording for JSON and typed
    requests."""
    unknown = sorted(n for n in names if n not in signature.inputs)
    if unknown:
        expected = ", ".join(sorted(signature.inputs)) or "none"
        raise InvalidArgument(
            f"unknown input {unknown[0]!r}: signature {signature_name!r} has the inputs {expected}"
        )


def _specs(infos: Any) -> dict[str, TensorSpec]:
    out = {}
    for name, info in infos.items():
        shape = (
            None if info.tensor_shape.unknown_rank else tuple(d.size for d in info.tensor_shape.dim)
        )
        out[name] = TensorSpec(info.dtype, shape)
    return out


class Inference:
    """Converts modelmux requests to TF Serving requests and back; knows signatures per version."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        # (servable, version) -> signatures, fetched once from a backend
        self._signatures: dict[tuple[str, int], asyncio.Future[dict[str, Signature]]] = {}

    async def predict(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        """Errors name dtypes as modelmux.v1 does (DATA_TYPE_INT32), the backend's too."""
        try:
            return await self._predict(data, context, call)
        except InvalidArgument as exc:
            raise InvalidArgument(in_modelmux_names(exc.message)) from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            raise InvalidArgument(in_modelmux_names(exc.details() or "")) from None

    async def _predict(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        request = parse(inference_pb2.PredictRequest, data)
        if not request.model:
            raise InvalidArgument("model is required")
        choice = request.WhichOneof("version_choice")
        call.model = request.model
        version, candidates = self.forwarder.pool.table.resolve(
            request.model,
            request.version if choice == "version" else None,
            request.version_label if choice == "version_label" else None,
        )
        use_json = request.HasField("json_inputs")
        if use_json and request.inputs:
            raise InvalidArgument("give inputs or json_inputs, not both")
        if not use_json and not request.inputs:
            raise InvalidArgument("no inputs: set inputs (typed tensors) or json_inputs")
        backend_request = predict_pb2.PredictRequest()
        spec = backend_request.model_spec
        spec.name = request.model
        spec.version.value = version
        spec.signature_name = request.signature_name or DEFAULT_SIGNATURE
        backend_request.output_filter.extend(request.output_filter)
        if use_json:
            # keyed by servable: content rewritten in place may change its signatures
            servable = candidates[0].servable
            signature = await self._signature(
                request.model, version, servable, spec.signature_name, context, call
            )
            self._json_inputs(request, signature, backend_request)
        else:
            for name, tensor in request.inputs.items():
                typed_to_proto(name, tensor, backend_request.inputs[name])
        try:
            raw = await self.forwarder.send(
                "Predict",
                backend_request.SerializeToString(),
                model=request.model,
                version=version,
                label=None,
                context=context,
                call=call,
            )
        except grpc.aio.AioRpcError as exc:
            if use_json or exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # typed inputs are not checked on the way (no signature needed): when the backend
            # refuses them, an unknown input name gets the same words as in the JSON form
            await self._check_names(request, version, candidates[0].servable, context, call)
            raise
        result = predict_pb2.PredictResponse.FromString(raw)
        response = inference_pb2.PredictResponse(
            model=request.model,
            version=result.model_spec.version.value or version,
            signature_name=result.model_spec.signature_name or spec.signature_name,
        )
        if use_json:
            response.json_outputs.CopyFrom(
                struct_from({name: proto_to_json(t) for name, t in result.outputs.items()})
            )
        else:
            for name, tensor in result.outputs.items():
                proto_to_typed(tensor, response.outputs[name])
        return bytes(response.SerializeToString())

    async def _check_names(
        self,
        request: Any,
        version: int,
        servable: str,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> None:
        name = request.signature_name or DEFAULT_SIGNATURE
        try:
            signature = await self._signature(request.model, version, servable, name, context, call)
        except Exception:  # the backend's own answer stands
            return
        check_input_names(request.inputs, signature, name)

    @staticmethod
    def _json_inputs(request: Any, signature: Signature, out: Any) -> None:
        values = struct_values(request.json_inputs)
        check_input_names(values, signature, out.model_spec.signature_name)
        for name, value in values.items():
            spec = signature.inputs[name]
            json_to_proto(
                name, value, out.inputs[name], tf_dtype=spec.dtype, signature_shape=spec.shape
            )

    async def _signature(
        self,
        model: str,
        version: int,
        servable: str,
        name: str,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> Signature:
        """The signature, fetched once per servable version; concurrent callers share the fetch,
        and if the caller doing it goes away, a waiting caller fetches for itself."""
        key = (servable, version)
        while True:
            future = self._signatures.get(key)
            if future is None or (future.done() and (future.cancelled() or future.exception())):
                future = asyncio.get_running_loop().create_future()
                self._signatures[key] = future
                try:
                    future.set_result(await self._fetch(model, version, context, call))
                except asyncio.CancelledError:
                    future.cancel()
                    raise
                except BaseException as exc:
                    future.set_exception(exc)
                    future.exception()  # retrieved: a later caller retries instead
                    raise
            try:
                signatures = await asyncio.shield(future)
                break
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not future.cancelled() or (task is not None and task.cancelling()):
                    raise  # this caller itself was cancelled
        if name not in signatures:
            known = ", ".join(sorted(signatures)) or "none"
            raise InvalidArgument(
                f"model {model!r} version {version} has no signature {shown(name)} (signatures: {known})"
            )
        return signatures[name]

    async def _fetch(
        self, model: str, version: int, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> dict[str, Signature]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        request.model_spec.version.value = version
        raw = await self.forwarder.send(
            "GetModelMetadata",
            request.SerializeToString(),
            model=model,
            version=version,
            label=None,
            context=context,
            call=call,
        )
        response = get_model_metadata_pb2.GetModelMetadataResponse.FromString(raw)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            name: Signature(_specs(sig.inputs), _specs(sig.outputs))
            for name, sig in signature_map.signature_def.items()
        }

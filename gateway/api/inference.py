"""``modelmux.v1.Inference``: Predict with typed tensors or JSON, on any TF Serving backend."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from gateway.edge import Call
from gateway.errors import InvalidArgument, parse, shown
from gateway.request import Resolved, Send, resolve
from gateway.routing import Tables
from gateway.signatures import Signature, check_input_names, specs
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


def _holding(resolved: Resolved, servable: str) -> Resolved:
    """The request, sent only where ``servable`` serves its version. While a version's content
    is being replaced its candidates may hold two servables with different signatures; a JSON
    request converted by one servable's signature is sent to that servable."""
    holders = tuple(t for t in resolved.candidates if t.servable == servable)
    if len(holders) == len(resolved.candidates):
        return resolved
    return resolved._replace(candidates=holders)


class Inference:
    """Converts modelmux requests to TF Serving requests and back; knows signatures per version."""

    def __init__(self, tables: Tables, send: Send) -> None:
        self.tables = tables
        self.send = send  # the path below: admission, batching, forwarding
        # (servable, version) -> signatures, fetched once from a backend holding that servable
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
        routed = resolve(
            self.tables.table,
            "Predict",
            b"",
            model=request.model,
            version=request.version if choice == "version" else None,
            label=request.version_label if choice == "version_label" else None,
        )
        version = routed.version
        # the backend request carries the routed version: nothing else to pin
        routed = routed._replace(asked=version, latest=False)
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
            routed = _holding(routed, routed.candidates[0].servable)
            signature = await self._signature(routed, spec.signature_name, context, call)
            self._json_inputs(request, signature, backend_request)
        else:
            for name, tensor in request.inputs.items():
                typed_to_proto(name, tensor, backend_request.inputs[name])
        outgoing = routed._replace(data=backend_request.SerializeToString())
        try:
            raw = await self.send(outgoing, context, call)
        except grpc.aio.AioRpcError as exc:
            if use_json or exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # typed inputs are not checked on the way (no signature needed): when the backend
            # refuses them, an unknown input name gets the same words as in the JSON form
            await self._check_names(request, routed, context, call)
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
        routed: Resolved,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> None:
        name = request.signature_name or DEFAULT_SIGNATURE
        routed = _holding(routed, routed.candidates[0].servable)
        try:
            signature = await self._signature(routed, name, context, call)
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
        routed: Resolved,
        name: str,
        context: grpc.aio.ServicerContext[Any, Any],
        call: Call,
    ) -> Signature:
        """The signature, fetched once per servable version from a backend holding that servable
        (``routed``'s candidates all hold it); concurrent callers share the fetch, and if the
        caller doing it goes away, a waiting caller fetches for itself."""
        model, version = routed.model, routed.version
        key = (routed.candidates[0].servable, version)
        while True:
            future = self._signatures.get(key)
            if future is None or (future.done() and (future.cancelled() or future.exception())):
                future = asyncio.get_running_loop().create_future()
                self._signatures[key] = future
                try:
                    future.set_result(await self._fetch(routed, context, call))
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
        self, routed: Resolved, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> dict[str, Signature]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = routed.model
        request.model_spec.version.value = routed.version
        fetch = routed._replace(method="GetModelMetadata", data=request.SerializeToString())
        raw = await self.send(fetch, context, call)
        response = get_model_metadata_pb2.GetModelMetadataResponse.FromString(raw)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            name: Signature(specs(sig.inputs), specs(sig.outputs))
            for name, sig in signature_map.signature_def.items()
        }

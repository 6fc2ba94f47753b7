"""TF Serving's gRPC services: ``tensorflow.serving.PredictionService`` and ``ModelService``.

Servicers stay thin: they resolve the model spec through the manager, run TensorFlow on a worker
thread and shape the response. Errors are mapped to status codes by :func:`rpc_edge` only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import structlog
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from backend import inference
from backend.errors import InvalidArgument, rpc_edge
from backend.manager import ModelManager
from backend.modelconfig import parse_config
from backend.servable import CLASSIFY_METHOD, REGRESS_METHOD, Servable
from backend.tensors import decode_inputs, encode_outputs, select_outputs
from backend.tfserving import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

log = structlog.get_logger("modelmux.backend")

DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_DEF_FIELD = "signature_def"
Context = grpc.aio.ServicerContext[Any, Any]


def resolve(manager: ModelManager, spec: model_pb2.ModelSpec) -> Servable:
    """(name, version | version_label | latest) -> the AVAILABLE servable, or NOT_FOUND."""
    if not spec.name:
        raise InvalidArgument("model_spec.name is empty")
    choice = spec.WhichOneof("version_choice")
    return manager.resolve(
        spec.name,
        version=spec.version.value if choice == "version" else None,
        label=(spec.version_label or None) if choice == "version_label" else None,
    )


def fill_spec(out: model_pb2.ModelSpec, servable: Servable, signature: str | None) -> None:
    """The resolved model spec that every response carries."""
    out.name = servable.model
    out.version.value = servable.version
    if signature is not None:
        out.signature_name = signature


def predict(servable: Servable, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Decodes, checks, runs and encodes one Predict call (blocking, on a worker thread)."""
    signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
    sigdef = servable.signature(signature)
    outputs = select_outputs(signature, sigdef, request.output_filter)
    inputs = decode_inputs(signature, sigdef, request.inputs)
    result = servable.run(signature, inputs, outputs)
    response = predict_pb2.PredictResponse()
    fill_spec(response.model_spec, servable, signature)
    for name, proto in encode_outputs(result).items():
        response.outputs[name].CopyFrom(proto)
    return response


class Device:
    """A stand-in for an accelerator, for benchmarks where the backend must be the bottleneck:
    each Predict holds one of ``slots`` for ``seconds`` (the device's service time, no CPU)."""

    def __init__(self, seconds: float, slots: int) -> None:
        self.seconds = seconds
        self.slots = slots
        self._free = asyncio.Semaphore(slots)

    async def run(self) -> None:
        async with self._free:
            await asyncio.sleep(self.seconds)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):  # type: ignore[misc]
    def __init__(self, manager: ModelManager, device: Device | None = None) -> None:
        self._manager = manager
        self._device = device

    @rpc_edge
    async def Predict(
        self, request: predict_pb2.PredictRequest, context: Context
    ) -> predict_pb2.PredictResponse:
        servable = resolve(self._manager, request.model_spec)
        if self._device is not None:
            await self._device.run()
        return await asyncio.to_thread(predict, servable, request)

    @rpc_edge
    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: Context
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidArgument(f"metadata_field is empty; ask for {SIGNATURE_DEF_FIELD!r}")
        for name in fields:
            if name != SIGNATURE_DEF_FIELD:
                raise InvalidArgument(
                    f"metadata_field {name!r} is not supported; supported: {SIGNATURE_DEF_FIELD!r}"
                )
        servable = resolve(self._manager, request.model_spec)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for name, sigdef in servable.signature_defs.items():
            signatures.signature_def[name].CopyFrom(sigdef)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        fill_spec(response.model_spec, servable, None)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
        return response

    @rpc_edge
    async def Classify(
        self, request: classification_pb2.ClassificationRequest, context: Context
    ) -> classification_pb2.ClassificationResponse:
        servable = resolve(self._manager, request.model_spec)
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        examples = inference.serialized_examples(request.input)
        result = await asyncio.to_thread(
            inference.run, servable, signature, CLASSIFY_METHOD, examples
        )
        response = classification_pb2.ClassificationResponse()
        fill_spec(response.model_spec, servable, signature)
        response.result.CopyFrom(result)
        return response

    @rpc_edge
    async def Regress(
        self, request: regression_pb2.RegressionRequest, context: Context
    ) -> regression_pb2.RegressionResponse:
        servable = resolve(self._manager, request.model_spec)
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        examples = inference.serialized_examples(request.input)
        result = await asyncio.to_thread(
            inference.run, servable, signature, REGRESS_METHOD, examples
        )
        response = regression_pb2.RegressionResponse()
        fill_spec(response.model_spec, servable, signature)
        response.result.CopyFrom(result)
        return response

    @rpc_edge
    async def MultiInference(
        self, request: inference_pb2.MultiInferenceRequest, context: Context
    ) -> inference_pb2.MultiInferenceResponse:
        jobs = _multi_inference_jobs(self._manager, request)
        examples = inference.serialized_examples(request.input)
        response = inference_pb2.MultiInferenceResponse()
        for servable, signature, method in jobs:
            result = await asyncio.to_thread(inference.run, servable, signature, method, examples)
            entry = response.results.add()
            fill_spec(entry.model_spec, servable, signature)
            if method == CLASSIFY_METHOD:
                entry.classification_result.CopyFrom(result)
            else:
                entry.regression_result.CopyFrom(result)
        return response


def _multi_inference_jobs(
    manager: ModelManager, request: inference_pb2.MultiInferenceRequest
) -> list[tuple[Servable, str, str]]:
    """Checks the tasks as TF Serving does: one model, distinct signatures, classify/regress."""
    if not request.tasks:
        raise InvalidArgument("tasks is empty; send at least one inference task")
    names = sorted({task.model_spec.name for task in request.tasks})
    if len(names) != 1:
        raise InvalidArgument(
            f"all tasks of a MultiInferenceRequest must use the same model; got: {', '.join(names)}"
        )
    jobs: list[tuple[Servable, str, str]] = []
    seen: set[str] = set()
    for index, task in enumerate(request.tasks):
        if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
            raise InvalidArgument(
                f"tasks[{index}]: method_name {task.method_name!r} is not supported; use "
                f"{CLASSIFY_METHOD!r} or {REGRESS_METHOD!r}"
            )
        signature = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature in seen:
            raise InvalidArgument(f"tasks[{index}]: signature {signature!r} is evaluated twice")
        seen.add(signature)
        jobs.append((resolve(manager, task.model_spec), signature, task.method_name))
    return jobs


class ModelService(model_service_pb2_grpc.ModelServiceServicer):  # type: ignore[misc]
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    @rpc_edge
    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: Context
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        if not spec.name:
            raise InvalidArgument("model_spec.name is empty")
        version = spec.version.value if spec.WhichOneof("version_choice") == "version" else None
        response = get_model_status_pb2.GetModelStatusResponse()
        for record in self._manager.status(spec.name, version):
            entry = response.model_version_status.add(version=record.version, state=record.state)
            if record.error is not None:
                entry.status.error_code = record.error.code.value[0]
                entry.status.error_message = record.error.message
        return response

    @rpc_edge
    async def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: Context
    ) -> model_management_pb2.ReloadConfigResponse:
        specs = parse_config(request.config)
        if specs is None:
            log.info("empty model server config; taking no action")
        else:
            await self._manager.apply(specs)
            log.info("model config applied", models=[spec.name for spec in specs])
        return model_management_pb2.ReloadConfigResponse()

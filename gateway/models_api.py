"""``modelmux.v1.Models``: what the gateway routes, and each version's state on each backend."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gateway.calls import Call
from gateway.errors import InvalidArgument, NotFound
from gateway.pool import Pool
from modelmux.v1 import models_pb2

_ACCELERATOR = {
    "cpu": models_pb2.ACCELERATOR_CPU,
    "gpu": models_pb2.ACCELERATOR_GPU,
    "inferentia": models_pb2.ACCELERATOR_INFERENTIA,
}


class Models:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def describe(self, name: str) -> models_pb2.Model:
        desired = self.pool.models[name]
        route = self.pool.table.routes.get(name)
        model = models_pb2.Model(
            name=name, api=desired.api, latest_version=route.latest if route else 0
        )
        model.labels.update(self.pool.labels.get(name, {}))
        versions: dict[int, models_pb2.ModelVersion] = {}
        for version, entries in self.pool.states(name).items():
            entry = versions.setdefault(version, models_pb2.ModelVersion(version=version))
            for backend, status in entries:
                entry.backends.add(
                    backend=backend.name,
                    address=backend.address,
                    accelerator=_ACCELERATOR[backend.accelerator],
                    state=status.state // 10,  # TF Serving states are 10..50
                    error=status.error,
                )
        for version, entry in versions.items():
            entry.routable = bool(route and version in route.versions)
        model.versions.extend(versions[v] for v in sorted(versions))
        return model

    async def list_models(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        response = models_pb2.ListModelsResponse(
            models=[self.describe(n) for n in sorted(self.pool.models)]
        )
        return bytes(response.SerializeToString())

    async def get_model(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        try:
            request = models_pb2.GetModelRequest.FromString(data)
        except DecodeError as exc:
            raise InvalidArgument(
                f"request is not a valid modelmux.v1.GetModelRequest: {exc}"
            ) from None
        call.model = request.name
        if request.name not in self.pool.models:
            known = ", ".join(sorted(self.pool.models)) or "none"
            raise NotFound(f"model {request.name!r} is not served here (models: {known})")
        return bytes(
            models_pb2.GetModelResponse(model=self.describe(request.name)).SerializeToString()
        )

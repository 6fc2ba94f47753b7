"""Stand-ins for the unit tier: a servicer context, in-memory backends and routing tables."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from gateway.routing import Endpoint, Route, Table, Target
from gateway.transport import MemoryTransport
from modelmux_common.tfserving import predict_pb2


class Context:
    """What the gateway reads of a grpc.aio servicer context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.callbacks: list[Callable[[object], None]] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        self.callbacks.append(callback)

    def done(self) -> bool:
        return self.aborted is not None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.RpcError(details)  # as grpc.aio does: abort never returns

    def finish(self) -> None:
        for callback in self.callbacks:
            callback(self)


Handler = Callable[[str, bytes], Awaitable[bytes]]


def endpoint(name: str, handler: Handler | None = None) -> Endpoint:
    return Endpoint(name, f"{name}.test:8500", MemoryTransport(handler))


def predict_reply(value: float = 1.0) -> bytes:
    reply = predict_pb2.PredictResponse()
    reply.outputs["y"].dtype = 1  # DT_FLOAT
    reply.outputs["y"].tensor_shape.dim.add(size=1)
    reply.outputs["y"].float_val.append(value)
    return bytes(reply.SerializeToString())


def table(
    versions: Mapping[int, tuple[Target, ...]],
    *,
    model: str = "m",
    labels: Mapping[str, int] | None = None,
    split: Mapping[int, int] | None = None,
    api: str = "api",
) -> Table:
    route = Route(model, versions, dict(labels or {}), dict(split or {}), api=api)
    return Table({model: route}, frozenset({model}))


def context() -> Any:
    return Context()

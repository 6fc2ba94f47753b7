"""How the gateway talks to one backend: the :class:`Transport` Protocol, gRPC's, and an in-memory
one for tests.

The request path uses ``forward`` only (raw bytes both ways: the gateway never decodes tensors);
a backend's reconciler uses ``reload`` and ``model_status``. ``MemoryTransport`` answers from a
function in the same process, the way httpx's ``MockTransport`` stands in for a network: unit tests
run the forwarder and the reconciler against it with no server and no port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import structlog

from modelmux_common.config import ClientTls
from modelmux_common.grpcutil import message_size_options
from modelmux_common.security import ClientCertificates, aio_channel
from modelmux_common.tfserving import (
    get_model_status_pb2,
    model_management_pb2,
)

Metadata = tuple[tuple[str, str], ...]
VersionState = get_model_status_pb2.ModelVersionStatus.State
AVAILABLE = VersionState.AVAILABLE
END = VersionState.END

_PS = "/tensorflow.serving.PredictionService/"
_MS = "/tensorflow.serving.ModelService/"
log = structlog.get_logger("modelmux.gateway")

FORWARDED_METHODS = ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One version of a servable as a backend reports it (TF Serving's state number)."""

    state: int
    error: str = ""


class Transport(Protocol):
    """A backend's calls. Failures are ``grpc.aio.AioRpcError`` (a refused reload:
    ``RuntimeError``), as the gateway maps them to the caller's status."""

    def forward(
        self, method: str, data: bytes, *, timeout: float | None, metadata: Metadata | None = None
    ) -> Awaitable[bytes]:
        """One of FORWARDED_METHODS: the serialized request in, the serialized reply out
        (``metadata``: the trace context, with tracing on)."""
        ...

    async def reload(self, config: Any, *, timeout: float) -> None:
        """Replace the backend's whole ModelServerConfig."""
        ...

    async def model_status(
        self, servable: str, *, timeout: float
    ) -> dict[int, VersionStatus] | None:
        """The servable's versions on the backend; None when it does not know the servable."""
        ...

    async def close(self, grace: float | None = None) -> None: ...


class GrpcTransport:
    """TF Serving's gRPC API on one channel; over TLS with ``tls``, on a new channel once the
    certificate files change (checked at each status poll and reload, never per forwarded call;
    the old channel's calls finish within ``RETIRE_GRACE``)."""

    RETIRE_GRACE = 30.0

    def __init__(
        self, address: str, *, max_message_bytes: int, tls: ClientTls | None = None
    ) -> None:
        self.address = address
        self._options: list[tuple[str, Any]] = [
            *message_size_options(max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", 30000),
        ]
        self._tls = ClientCertificates(tls) if tls is not None else None
        self._retiring: set[asyncio.Task[None]] = set()
        self._open()

    def _open(self) -> None:
        self.channel = aio_channel(self.address, self._tls, self._options)
        # raw bytes both ways: no (de)serializer, so gRPC calls no Python function per message
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {
            method: self.channel.unary_unary(_PS + method) for method in FORWARDED_METHODS
        }
        self._status = self.channel.unary_unary(
            _MS + "GetModelStatus",
            request_serializer=get_model_status_pb2.GetModelStatusRequest.SerializeToString,
            response_deserializer=get_model_status_pb2.GetModelStatusResponse.FromString,
        )
        self._reload = self.channel.unary_unary(
            _MS + "HandleReloadConfigRequest",
            request_serializer=model_management_pb2.ReloadConfigRequest.SerializeToString,
            response_deserializer=model_management_pb2.ReloadConfigResponse.FromString,
        )

    def _renew(self) -> None:
        """A new channel when the TLS files changed; the old one closes in the background."""
        if self._tls is None or not self._tls.changed():
            return
        old = self.channel
        self._open()
        log.info("backend_tls_reloaded", address=self.address)
        task = asyncio.get_running_loop().create_task(old.close(grace=self.RETIRE_GRACE))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def forward(
        self, method: str, data: bytes, *, timeout: float | None, metadata: Metadata | None = None
    ) -> Awaitable[bytes]:
        # the call object itself is awaited: no coroutine frame of ours per call
        return self._calls[method](data, timeout=timeout, metadata=metadata)

    async def reload(self, config: Any, *, timeout: float) -> None:
        self._renew()
        request = model_management_pb2.ReloadConfigRequest(config=config)
        response = await self._reload(request, timeout=timeout)
        if response.status.error_code:
            raise RuntimeError(
                response.status.error_message or f"error {response.status.error_code}"
            )

    async def model_status(
        self, servable: str, *, timeout: float
    ) -> dict[int, VersionStatus] | None:
        self._renew()
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = servable
        try:
            response = await self._status(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return {
            s.version: VersionStatus(s.state, s.status.error_message if s.status.error_code else "")
            for s in response.model_version_status
        }

    async def close(self, grace: float | None = None) -> None:
        await self.channel.close(grace=grace)
        for task in list(self._retiring):
            task.cancel()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a backend call fails with, as an in-memory transport raises it."""
    empty = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, empty, empty, details)


Forward = Callable[[str, bytes], Awaitable[bytes]]


class MemoryTransport:
    """A backend in this process: ``handler(method, data)`` answers forwarded calls (or raises
    :func:`rpc_error`); ``statuses`` (servable -> version -> status) answers status polls, and
    ``configs`` records every config pushed. While ``down`` is set, every call fails with it."""

    def __init__(
        self,
        handler: Forward | None = None,
        *,
        statuses: Mapping[str, Mapping[int, VersionStatus]] | None = None,
    ) -> None:
        self.handler = handler
        self.statuses: dict[str, dict[int, VersionStatus]] = {
            name: dict(versions) for name, versions in (statuses or {}).items()
        }
        self.configs: list[Any] = []
        self.sent: list[tuple[str, bytes]] = []
        self.metadata: list[Metadata] = []  # of each forwarded call, in order
        self.down: grpc.aio.AioRpcError | None = None
        self.closed = False

    async def forward(
        self, method: str, data: bytes, *, timeout: float | None, metadata: Metadata | None = None
    ) -> bytes:
        self.sent.append((method, data))
        self.metadata.append(metadata or ())
        if self.down is not None:
            raise self.down
        if self.handler is None:
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"no handler for {method}")
        return await self.handler(method, data)

    async def reload(self, config: Any, *, timeout: float) -> None:
        if self.down is not None:
            raise self.down
        self.configs.append(config)

    async def model_status(
        self, servable: str, *, timeout: float
    ) -> dict[int, VersionStatus] | None:
        if self.down is not None:
            raise self.down
        versions = self.statuses.get(servable)
        return None if versions is None else dict(versions)

    async def close(self, grace: float | None = None) -> None:
        self.closed = True

"""The backend pool: one connection and one reconciler per TF Serving backend.

Each reconciler owns its backend's model configuration (TF Serving replaces the whole config on
every HandleReloadConfigRequest, so it always sends the complete desired config, one reload in
flight) and polls GetModelStatus; the pool turns the reported states into a routing table.
Version labels are sent only for versions the backend already reports AVAILABLE, as TF Serving
refuses labels on versions it has not loaded; the next round after they load adds them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from gateway.catalog import DesiredModel
from gateway.routing import Route, Table
from modelmux_common.config import BackendConfig, GatewayConfig
from modelmux_common.grpcutil import message_size_options
from modelmux_common.tfserving import (
    get_model_status_pb2,
    model_management_pb2,
    model_server_config_pb2,
)

log = structlog.get_logger("modelmux.gateway")

VersionState = get_model_status_pb2.ModelVersionStatus.State
AVAILABLE = VersionState.AVAILABLE
END = VersionState.END

_PS = "/tensorflow.serving.PredictionService/"
_MS = "/tensorflow.serving.ModelService/"
FORWARDED_METHODS = ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")

CONVERGING_POLL = 0.2
MAX_BACKOFF = 5.0


@dataclass(frozen=True, slots=True)
class VersionStatus:
    state: int
    error: str = ""


def _identity(data: bytes) -> bytes:
    return data


class Backend:
    """A TF Serving backend: its channel, raw-bytes call handles and last reported model state."""

    def __init__(self, config: BackendConfig, gateway: GatewayConfig) -> None:
        self.config = config
        self.name = config.name
        self.address = config.address
        self.accelerator = config.accelerator
        self.outstanding = 0
        options = [
            *message_size_options(gateway.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", 30000),
        ]
        self.channel = grpc.aio.insecure_channel(config.address, options=options)
        self.calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {
            method: self.channel.unary_unary(
                _PS + method, request_serializer=_identity, response_deserializer=_identity
            )
            for method in FORWARDED_METHODS
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
        self.reachable = False
        self.last_error = ""
        # model -> version -> status, as last reported
        self.models: dict[str, dict[int, VersionStatus]] = {}
        # the config last accepted by the backend; None forces a push
        self.pushed: Any = None

    def __repr__(self) -> str:
        return f"Backend({self.name}@{self.address})"

    async def reload(self, config: Any, timeout: float) -> None:
        request = model_management_pb2.ReloadConfigRequest(config=config)
        response = await self._reload(request, timeout=timeout)
        if response.status.error_code:
            raise RuntimeError(
                response.status.error_message or f"error {response.status.error_code}"
            )
        self.pushed = config

    async def model_status(self, model: str, timeout: float) -> dict[int, VersionStatus] | None:
        """The model's versions on this backend; None when the backend does not know the model."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
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

    async def close(self) -> None:
        await self.channel.close(grace=None)


def desired_config(
    backend: Backend, models: Sequence[DesiredModel], labels: Mapping[str, Mapping[str, int]]
) -> Any:
    """The complete ModelServerConfig this backend should run (labels only on loaded versions)."""
    config = model_server_config_pb2.ModelServerConfig()
    for model in models:
        entry = config.model_config_list.config.add()
        entry.name = model.name
        entry.base_path = model.base_path
        entry.model_platform = "tensorflow"
        entry.model_version_policy.specific.versions.extend(model.versions)
        loaded = backend.models.get(model.name, {})
        for label, version in sorted(labels.get(model.name, {}).items()):
            status = loaded.get(version)
            if status is not None and status.state == AVAILABLE:
                entry.version_labels[label] = version
    return config


class Pool:
    """All backends, their reconcilers, and the routing table built from what they report."""

    def __init__(
        self,
        *,
        config: GatewayConfig,
        backends: Sequence[BackendConfig],
        models: Mapping[str, DesiredModel],
        labels: Mapping[str, Mapping[str, int]],
        on_change: Callable[[Table], None] | None = None,
    ) -> None:
        self.config = config
        self.backends = [Backend(b, config) for b in backends]
        self.models = dict(models)
        self.labels = {m: dict(v) for m, v in labels.items()}
        self.table = Table(known=frozenset(self.models))
        self._on_change = on_change
        self._wake = {b.name: asyncio.Event() for b in self.backends}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def placed(self, backend: Backend) -> list[DesiredModel]:
        return [m for m in self.models.values() if m.placed_on(backend.config)]

    def start(self) -> None:
        for backend in self.backends:
            self._tasks.append(
                asyncio.create_task(self._reconcile(backend), name=f"reconcile-{backend.name}")
            )

    def poke(self, backend: Backend) -> None:
        """Ask a reconciler to look at its backend now (e.g. after a failed call)."""
        self._wake[backend.name].set()

    async def close(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(b.close() for b in self.backends))

    async def _reconcile(self, backend: Backend) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                converged = await self._round(backend)
                backoff = 0.1
                wait = self.config.status_interval if converged else CONVERGING_POLL
            except grpc.aio.AioRpcError as exc:
                self._mark_unreachable(backend, f"{exc.code().name}: {exc.details()}")
                wait, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            except RuntimeError as exc:
                backend.last_error = str(exc)
                log.warning("backend_reload_failed", backend=backend.name, error=str(exc))
                wait, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            event = self._wake[backend.name]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait)
            event.clear()

    async def _round(self, backend: Backend) -> bool:
        """Push the config if it changed, poll status; True when nothing is still loading."""
        timeout = min(self.config.backend_timeout, 10.0)
        placed = self.placed(backend)
        wanted = desired_config(backend, placed, self.labels)
        if wanted != backend.pushed:
            log.info("backend_reload", backend=backend.name, models=[m.name for m in placed])
            await backend.reload(wanted, timeout=max(timeout, self.config.backend_timeout))
        states: dict[str, dict[int, VersionStatus]] = {}
        for model in placed:
            status = await backend.model_status(model.name, timeout)
            if status is None:
                backend.pushed = None  # the backend lost its config (restarted): push again
                return False
            states[model.name] = status
        if not backend.reachable:
            log.info("backend_reachable", backend=backend.name, address=backend.address)
        backend.reachable, backend.last_error = True, ""
        if states != backend.models:
            backend.models = states
            self._rebuild()
        if desired_config(backend, placed, self.labels) != backend.pushed:
            return False
        return all(
            states[m.name].get(v, VersionStatus(0)).state in (AVAILABLE, END)
            for m in placed
            for v in m.versions
        )

    def _mark_unreachable(self, backend: Backend, error: str) -> None:
        if backend.reachable or not backend.last_error:
            log.warning(
                "backend_unreachable", backend=backend.name, address=backend.address, error=error
            )
        backend.reachable, backend.last_error, backend.pushed = False, error, None
        if backend.models:
            backend.models = {}
            self._rebuild()

    def _rebuild(self) -> None:
        routes: dict[str, Route] = {}
        for name in self.models:
            versions: dict[int, list[Backend]] = {}
            for backend in self.backends:
                for version, status in backend.models.get(name, {}).items():
                    if status.state == AVAILABLE:
                        versions.setdefault(version, []).append(backend)
            if versions:
                labels = dict(self.labels.get(name, {}))
                routes[name] = Route(name, {v: tuple(b) for v, b in versions.items()}, labels)
        self.table = Table(routes=routes, known=frozenset(self.models))
        if self._on_change is not None:
            self._on_change(self.table)

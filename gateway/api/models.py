"""``modelmux.v1.Models``: what the gateway routes, each version's state on each backend, routing
changes as a stream, and the admin calls that move labels and split traffic. Every model the
gateway knows is listed, those it cannot serve with their state and the reason."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gateway.admission import Admission
from gateway.edge import Call
from gateway.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    parse,
    shown,
)
from gateway.fleet.fleet import Fleet
from gateway.routing import Table
from modelmux.v1 import models_pb2
from modelmux_common.config import NAME_RE

_ACCELERATOR = {
    "cpu": models_pb2.ACCELERATOR_CPU,
    "gpu": models_pb2.ACCELERATOR_GPU,
    "inferentia": models_pb2.ACCELERATOR_INFERENTIA,
}
WATCH_QUEUE = 1000


def check_label(label: str) -> None:
    """INVALID_ARGUMENT unless ``label`` is a valid name, by the rule names in the config follow."""
    if not label:
        raise InvalidArgument("label is required")
    if not NAME_RE.match(label):
        raise InvalidArgument(
            f"label {shown(label)} is not a valid name (letters, digits, '_', '.', '-'; at most "
            "128 characters, starting with a letter or digit), as in the config"
        )


class Models:
    def __init__(
        self,
        fleet: Fleet,
        admission: Admission,
        *,
        backend_max_inflight: int,
        admin_token: str = "",
    ) -> None:
        self.fleet = fleet
        self.admission = admission
        self.backend_max_inflight = backend_max_inflight
        self.admin_token = admin_token
        self._watchers: set[asyncio.Queue[models_pb2.WatchModelsResponse | None]] = set()
        self._last: dict[str, tuple[Any, ...]] = {}

    def describe(self, name: str) -> models_pb2.Model:
        table = self.fleet.table
        desired = self.fleet.desired
        route = table.routes.get(name)
        model = models_pb2.Model(
            name=name, api=desired.api_of(name), latest_version=route.latest if route else 0
        )
        status = table.states.get(name)
        if status is not None:
            model.state = models_pb2.ModelState.Value(f"MODEL_STATE_{status.state}")
            model.reason = status.reason
        effective = dict(route.labels) if route else {}
        model.labels.update(effective)
        model.pending_labels.update(
            {lb: v for lb, v in desired.labels.get(name, {}).items() if effective.get(lb) != v}
        )
        model.traffic_split.update(desired.splits.get(name, {}))
        states = self.fleet.states(name) if name in desired.models else {}
        refused = desired.problems.refused.get(name, {})
        for version in sorted(set(states) | {v for v in refused if v is not None}):
            entry = model.versions.add(
                version=version,
                routable=bool(route and version in route.versions),
                refusal=refused.get(version, ""),
            )
            for report, st in states.get(version, ()):
                entry.backends.add(
                    backend=report.name,
                    address=report.config.address,
                    accelerator=_ACCELERATOR[report.config.accelerator],
                    state=st.state // 10,  # TF Serving states are 10..50
                    error=st.error,
                )
        return model

    def _known(self, name: str) -> None:
        if name not in self.fleet.table.known:
            known = ", ".join(sorted(self.fleet.table.known)) or "none"
            raise NotFound(f"model {shown(name)} is not served here (models: {known})")

    def _versions(self, name: str) -> Any:
        desired = self.fleet.desired.models.get(name)
        return desired.versions if desired is not None else {}

    async def list_models(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        parse(models_pb2.ListModelsRequest, data)
        limits = models_pb2.Limits(
            max_inflight=self.admission.max_inflight,
            backend_max_inflight=self.backend_max_inflight,
            inflight=self.admission.inflight,
        )
        response = models_pb2.ListModelsResponse(
            models=[self.describe(n) for n in sorted(self.fleet.table.known)], limits=limits
        )
        return bytes(response.SerializeToString())

    async def get_model(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        request = parse(models_pb2.GetModelRequest, data)
        call.model = request.name
        self._known(request.name)
        return bytes(
            models_pb2.GetModelResponse(model=self.describe(request.name)).SerializeToString()
        )

    # --- admin ----------------------------------------------------------------------------------

    def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self.admin_token:
            return
        sent = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not sent:
            raise Unauthenticated("admin calls need metadata 'authorization: Bearer <token>'")
        token = str(sent).removeprefix("Bearer ").strip()
        if not hmac.compare_digest(token.encode(), self.admin_token.encode()):
            raise PermissionDenied("the admin token does not match gateway.admin_token")

    async def set_version_label(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        self._authorize(context)
        request = parse(models_pb2.SetVersionLabelRequest, data)
        call.model = request.model
        self._known(request.model)
        check_label(request.label)
        versions = self._versions(request.model)
        if request.version and request.version not in versions:
            known = ", ".join(str(v) for v in sorted(versions)) or "none"
            raise NotFound(
                f"model {request.model!r} has no version {request.version} (versions: {known})"
            )
        self.fleet.set_label(request.model, request.label, request.version)
        return bytes(
            models_pb2.SetVersionLabelResponse(
                model=self.describe(request.model)
            ).SerializeToString()
        )

    async def set_traffic_split(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any], call: Call
    ) -> bytes:
        self._authorize(context)
        request = parse(models_pb2.SetTrafficSplitRequest, data)
        call.model = request.model
        self._known(request.model)
        versions = self._versions(request.model)
        unknown = sorted(v for v in request.weights if v not in versions)
        if unknown:
            raise NotFound(f"model {request.model!r} has no version {unknown[0]}")
        if request.weights and not any(request.weights.values()):
            raise InvalidArgument("every weight is 0: give at least one version a positive weight")
        self.fleet.set_split(request.model, dict(request.weights))
        return bytes(
            models_pb2.SetTrafficSplitResponse(
                model=self.describe(request.model)
            ).SerializeToString()
        )

    # --- watch ----------------------------------------------------------------------------------

    def _routing_key(self, name: str, table: Table) -> tuple[Any, ...]:
        route = table.routes.get(name)
        return (
            tuple(sorted(route.versions)) if route else (),
            tuple(sorted(route.labels.items())) if route else (),
            tuple(sorted(self.fleet.desired.labels.get(name, {}).items())),
            tuple(sorted(self.fleet.desired.splits.get(name, {}).items())),
            table.states.get(name),
        )

    def publish(self, table: Table) -> None:
        """Called on every routing table change: tells watchers what changed."""
        changes: list[models_pb2.WatchModelsResponse] = []
        for name in sorted(table.known):
            key = self._routing_key(name, table)
            if self._last.get(name) != key:
                self._last[name] = key
                changes.append(models_pb2.WatchModelsResponse(model=self.describe(name)))
        for name in sorted(set(self._last) - table.known):
            del self._last[name]
            changes.append(
                models_pb2.WatchModelsResponse(model=models_pb2.Model(name=name), removed=True)
            )
        for queue in list(self._watchers):
            for change in changes:
                if queue.qsize() >= WATCH_QUEUE:
                    self._watchers.discard(queue)
                    queue.put_nowait(None)  # tell the stream it fell behind (the slot is reserved)
                    break
                queue.put_nowait(change)

    async def watch_models(
        self, data: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        request = parse(models_pb2.WatchModelsRequest, data)
        wanted = set(request.models)
        queue: asyncio.Queue[models_pb2.WatchModelsResponse | None] = asyncio.Queue(WATCH_QUEUE + 1)
        self._watchers.add(queue)
        try:
            for name in sorted(self.fleet.table.known):
                if not wanted or name in wanted:
                    yield models_pb2.WatchModelsResponse(
                        model=self.describe(name)
                    ).SerializeToString()
            while True:
                change = await queue.get()
                if change is None:
                    raise ResourceExhausted(
                        "this watcher fell behind; reconnect to get the current state"
                    )
                if not wanted or change.model.name in wanted:
                    yield change.SerializeToString()
        finally:
            self._watchers.discard(queue)

"""The fleet: the desired state, one reconciler per backend, and the routing table built from
both. It composes; the work is in gateway.fleet.desired (what to serve), gateway.fleet.reconciler
(one backend each) and gateway.fleet.table (the pure table builder)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from gateway.catalog import DesiredModel, Expected, Problems
from gateway.fleet.desired import Desired, with_models
from gateway.fleet.reconciler import Reconciler
from gateway.fleet.report import Report
from gateway.fleet.table import build, version_states
from gateway.routing import Table
from gateway.transport import GrpcTransport, Transport, VersionStatus
from modelmux_common.config import BackendConfig, GatewayConfig

log = structlog.get_logger("modelmux.gateway")

TransportFactory = Callable[[BackendConfig], Transport]


class Fleet:
    def __init__(
        self,
        *,
        config: GatewayConfig,
        backends: Sequence[BackendConfig],
        models: Mapping[str, DesiredModel],
        labels: Mapping[str, Mapping[str, int]],
        manage: bool = True,
        expected: Mapping[str, Expected] | None = None,
        transport: TransportFactory | None = None,
    ) -> None:
        self.config = config
        self._transport = transport or (
            lambda b: GrpcTransport(
                b.address, max_message_bytes=config.max_message_bytes, tls=b.tls
            )
        )
        self.desired = Desired(
            models=dict(models),
            labels={m: dict(v) for m, v in labels.items()},
            expected=dict(expected or {}),
            backend_configs=tuple(backends),
            manage=manage,
            hold=2 * config.status_interval + 1.0 if config.workers > 1 else 0.0,
        )
        # dns:///name:port entries are expanded by gateway.fleet.discovery into one backend each
        self.reconcilers = [
            self._reconciler(b) for b in backends if not b.address.startswith("dns:")
        ]
        self.effective: Mapping[str, Mapping[str, int]] = self.desired.labels
        self.table = Table()
        # called with every new table (set once the gateway is composed)
        self.on_change: Callable[[Table], None] | None = None
        self._started = False
        self._rebuild()

    def _reconciler(self, config: BackendConfig) -> Reconciler:
        return Reconciler(
            config,
            self._transport(config),
            gateway=self.config,
            desired=lambda: self.desired,
            changed=self._rebuild,
        )

    # --- desired state --------------------------------------------------------------------------

    def update(self, models: Mapping[str, DesiredModel]) -> None:
        """Replace the desired models (e.g. from modelsync); routing moves as backends load them."""
        self.desired = with_models(self.desired, models, self.reports(), time.monotonic())
        self._rebuild()
        for reconciler in self.reconcilers:
            reconciler.poke()

    def set_problems(self, problems: Problems) -> None:
        """What modelsync refuses and which sources fail, for the models' states."""
        self.desired = dataclasses.replace(self.desired, problems=problems)
        self._rebuild()

    def set_label(self, model: str, label: str, version: int) -> None:
        """Ask a label to point at ``version`` (0 deletes it); it moves when the version is ready."""
        labels = {m: dict(v) for m, v in self.desired.labels.items()}
        if version:
            labels.setdefault(model, {})[label] = version
        else:
            labels.get(model, {}).pop(label, None)
        self.desired = dataclasses.replace(self.desired, labels=labels)
        self._rebuild()

    def set_split(self, model: str, weights: Mapping[int, int]) -> None:
        splits = {m: dict(v) for m, v in self.desired.splits.items() if m != model}
        if weights:
            splits[model] = dict(weights)
        self.desired = dataclasses.replace(self.desired, splits=splits)
        self._rebuild()

    # --- reading --------------------------------------------------------------------------------

    def reports(self) -> list[Report]:
        return [r.report() for r in self.reconcilers]

    def states(self, name: str) -> dict[int, list[tuple[Report, VersionStatus]]]:
        """Each version of a model and its state on every backend it is placed on."""
        return version_states(self.desired, self.reports(), name)

    def _rebuild(self) -> None:
        built = build(self.desired, self.reports(), self.effective, time.monotonic())
        for model, label, version in built.moves:
            log.info("label_moved", model=model, label=label, version=version)
        self.effective = built.effective
        if built.previous != self.desired.previous:
            self.desired = dataclasses.replace(self.desired, previous=built.previous)
        self.table = built.table
        if self.on_change is not None:
            self.on_change(self.table)

    # --- backends -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.reconcilers]

    def start(self) -> None:
        self._started = True
        for reconciler in self.reconcilers:
            reconciler.start()

    def add(self, config: BackendConfig) -> None:
        """A backend appeared (discovery): it gets its full config from its own reconciler."""
        reconciler = self._reconciler(config)
        self.reconcilers.append(reconciler)
        log.info("backend_added", backend=config.name, address=config.address)
        if self._started:
            reconciler.start()

    async def remove(self, name: str) -> None:
        """A backend went away (discovery): routing drops it before its channel closes."""
        reconciler = next((r for r in self.reconcilers if r.name == name), None)
        if reconciler is None:
            return
        self.reconcilers.remove(reconciler)
        self._rebuild()
        await reconciler.stop()
        await reconciler.transport.close(grace=min(self.config.backend_timeout, 30.0))
        log.info("backend_removed", backend=name, address=reconciler.config.address)

    async def close(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.reconcilers))
        await asyncio.gather(*(r.transport.close() for r in self.reconcilers))

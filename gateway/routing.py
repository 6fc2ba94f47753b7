"""The routing table: which backends hold which model versions, and how a request picks one.

The table is an immutable snapshot rebuilt whenever a backend's reported state changes; the request
path only reads the current snapshot, so it needs no locks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.errors import FailedPrecondition, GatewayError, NotFound, Unavailable, shown

if TYPE_CHECKING:
    from gateway.transport import Transport

# What ModelStatus.state can be: modelmux.v1.ModelState without its prefix.
AVAILABLE = "AVAILABLE"
LOADING = "LOADING"
PENDING = "PENDING"
REFUSED = "REFUSED"
FAILED = "FAILED"
SOURCE_FAILING = "SOURCE_FAILING"
# Not worth retrying: nothing changes until someone fixes the model, its source or the config.
TERMINAL = frozenset({REFUSED, FAILED})
# Known for what it is: start-up does not wait for these any longer (see Gateway._on_table).
SETTLED = frozenset({AVAILABLE, REFUSED, FAILED, SOURCE_FAILING})


def _nothing() -> None:
    pass


@dataclass(eq=False, slots=True)
class Endpoint:
    """A backend as the request path sees it. Its counters are written by gateway.forwarding
    only (the one place that sees calls start and end); ``poke`` asks the backend's reconciler
    to look at it now (after a call it provably never ran)."""

    name: str
    address: str
    transport: Transport
    poke: Callable[[], None] = _nothing
    outstanding: int = 0  # calls in flight on it
    # passive outlier ejection: consecutive failed calls, and until when routing avoids it
    call_failures: int = 0
    ejected_until: float = 0.0

    def __repr__(self) -> str:
        return f"Endpoint({self.name}@{self.address})"


@dataclass(frozen=True, slots=True)
class Target:
    """A backend and the servable on it that holds the version."""

    backend: Endpoint
    servable: str
    # The version is the highest the backend knows for the servable, the catalogue holds none
    # higher, and this gateway configures the backend: it is the backend's own latest, so a call
    # for latest needs no pin to it.
    top: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """One model's routable versions."""

    model: str
    # version -> where it is AVAILABLE (only routable versions appear)
    versions: Mapping[int, Sequence[Target]]
    labels: Mapping[str, int]
    # version -> weight of "latest" traffic; empty for plain latest
    split: Mapping[int, int] = field(default_factory=dict)
    # the API the model belongs to (server-side batching is set per API)
    api: str = ""

    @property
    def latest(self) -> int:
        return max(self.versions, default=0)

    def pick_latest(self) -> int:
        """The highest routable version, or a weighted choice when a traffic split is set."""
        if self.split:
            choices = [(v, w) for v, w in self.split.items() if w > 0 and v in self.versions]
            if choices:
                chosen: int = random.choices([v for v, _ in choices], [w for _, w in choices])[0]
                return chosen
        return self.latest


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """Whether a model can be called, and if not, why not."""

    state: str
    reason: str = ""

    def error(self, model: str) -> GatewayError:
        """The status of a call for the model while it has no routable version."""
        if self.state in TERMINAL:
            return FailedPrecondition(f"model {model!r} cannot be served: {self.reason}")
        return Unavailable(f"model {model!r} has no version available yet: {self.reason}")


@dataclass(frozen=True, slots=True)
class Table:
    routes: Mapping[str, Route] = field(default_factory=dict)
    # Every model the gateway is configured to serve, routable or not.
    known: frozenset[str] = frozenset()
    # model -> versions it is configured to serve (routable or still loading, failed, unreachable)
    configured: Mapping[str, frozenset[int]] = field(default_factory=dict)
    # model -> its state and why (every known model)
    states: Mapping[str, ModelStatus] = field(default_factory=dict)
    # (model, version) -> why that version cannot be served: refused by modelsync, or failed to
    # load on every backend it is placed on (routable versions never appear)
    failed_versions: Mapping[tuple[str, int], str] = field(default_factory=dict)

    def resolve(
        self, model: str, version: int | None, label: str | None
    ) -> tuple[int, Sequence[Target]]:
        """(version, candidate backends) for a request; NOT_FOUND for what the gateway does not
        know, FAILED_PRECONDITION for what cannot be served (refused, failed to load),
        UNAVAILABLE for what is not loaded yet, each with the reason."""
        route = self.routes.get(model)
        if route is None:
            status = self.states.get(model)
            if status is not None:
                raise status.error(model)
            if model in self.known:
                raise Unavailable(f"model {model!r} has no version available on any backend yet")
            known = ", ".join(sorted(self.known)) or "none"
            raise NotFound(f"model {shown(model)} is not served here (models: {known})")
        if label:
            target = route.labels.get(label)
            if target is None:
                labels = ", ".join(sorted(route.labels)) or "none"
                raise NotFound(
                    f"model {model!r} has no version label {shown(label)} (labels: {labels})"
                )
            version = target
        elif version is None or version == 0:
            version = route.pick_latest()
        backends = route.versions.get(version)
        if backends:
            return version, backends
        what = (
            f"label {label!r} points at version {version}, which" if label else f"version {version}"
        )
        why = self.failed_versions.get((model, version))
        if why is not None:
            raise FailedPrecondition(f"model {model!r}: {what} cannot be served: {why}")
        if version in self.configured.get(model, ()):
            raise Unavailable(
                f"model {model!r}: {what} is configured but not loaded on any reachable backend"
            )
        versions = ", ".join(str(v) for v in sorted(route.versions)) or "none"
        raise NotFound(f"model {model!r}: {what} is not available (available versions: {versions})")


class Tables(Protocol):
    """Where the current table is (the fleet rebuilds it; the request path reads it)."""

    table: Table

"""The desired state: which models, versions, labels and splits the backends should serve, and
the old contents kept loaded while a version's new content is not settled yet. Immutable: each
change makes a new :class:`Desired`, which the reconcilers and the table builder read."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.catalog import DesiredModel, Expected, Problems, Servable
from gateway.fleet.report import Report
from modelmux_common.config import BackendConfig


@dataclass(frozen=True, slots=True)
class Desired:
    models: Mapping[str, DesiredModel] = field(default_factory=dict)
    # labels as asked (config or admin RPC); they move once their new target is ready
    labels: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # model -> version -> weight of "latest" traffic
    splits: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    # models the config names: listed (and waited for) before anything is published
    expected: Mapping[str, Expected] = field(default_factory=dict)
    # what modelsync refuses and which sources fail (see gateway.follower)
    problems: Problems = field(default_factory=Problems)
    # every configured backend, dns:/// entries included: where a model could be placed
    backend_configs: tuple[BackendConfig, ...] = ()
    # (model, version) -> the servable that served it before its content was replaced
    previous: Mapping[tuple[str, int], Servable] = field(default_factory=dict)
    # (model, version) removed -> (its model, its servable, until when it stays loaded)
    retired: Mapping[tuple[str, int], tuple[DesiredModel, Servable, float]] = field(
        default_factory=dict
    )
    # False in gateway workers other than the first: they watch backends, never configure them
    manage: bool = True
    # With several workers, a replaced servable stays loaded this long after its successor is
    # AVAILABLE, so that every worker (each polling on its own) routes away from it first.
    hold: float = 0.0

    def api_of(self, name: str) -> str:
        """The API a known model belongs to."""
        if name in self.models:
            return self.models[name].api
        if name in self.expected:
            return self.expected[name].api
        return self.problems.apis.get(name, "")


def with_models(
    desired: Desired, models: Mapping[str, DesiredModel], reports: Sequence[Report], now: float
) -> Desired:
    """New desired models (e.g. from modelsync). A version whose content changed keeps its old
    servable as ``previous`` until the new one settled; with a hold, a removed version stays
    loaded (``retired``) for that long."""
    previous = dict(desired.previous)
    for name, model in models.items():
        old = desired.models.get(name)
        if old is None:
            continue
        for version, servable in model.versions.items():
            before = old.versions.get(version)
            if before is None or before == servable:
                continue
            # Keep the content that serves: a second rewrite while the first is still
            # loading (or failed) must not displace the servable routing still uses.
            serving = any(r.available(before, version) for r in reports)
            if (name, version) not in previous or serving:
                previous[(name, version)] = old.servables[before]
    previous = {
        key: old
        for key, old in previous.items()
        if key[0] in models and key[1] in models[key[0]].versions
    }
    retired = {k: r for k, r in desired.retired.items() if r[2] > now}
    if desired.hold:
        until = now + desired.hold
        for name, old in desired.models.items():
            for version, servable in old.versions.items():
                if version not in (models[name].versions if name in models else {}):
                    retired[(name, version)] = (old, old.servables[servable], until)
    return dataclasses.replace(desired, models=dict(models), previous=previous, retired=retired)


def wanted(desired: Desired, report: Report, now: float) -> list[Servable]:
    """Every servable one backend should hold, old content included until its successor
    settled; a version that failed to load is left out until its retry is due (leaving it out
    and putting it back is what makes TF Serving try again)."""
    entries: dict[str, tuple[str, set[int]]] = {}
    backend = report.config

    def add(servable: Servable, versions: tuple[int, ...]) -> None:
        due = {v for v in versions if report.retry_at.get((servable.name, v), 0.0) <= now}
        if due:
            entries.setdefault(servable.name, (servable.base_path, set()))[1].update(due)

    for (name, version), (gone, retiring, until) in desired.retired.items():
        still = desired.models.get(name)
        if (
            until > now
            and gone.placed_on(backend)
            and (still is None or version not in still.versions)
        ):
            add(retiring, (version,))
    for model in desired.models.values():
        if not model.placed_on(backend):
            continue
        for servable in model.servables.values():
            add(servable, servable.versions)
        for version, current in model.versions.items():
            old = desired.previous.get((model.name, version))
            if (
                old is not None
                and not report.settled(current, version, now=now, hold=desired.hold)
                and report.available(old.name, version)
            ):
                add(old, (version,))
    return [Servable(name, base, tuple(sorted(vs))) for name, (base, vs) in entries.items()]

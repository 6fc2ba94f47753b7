"""The table builder: desired state + what the backends report -> the routing table. A pure
function (the time comes in as an argument), so that every case is a table-driven unit test.

Every model the gateway knows (named by the config, published or refused by modelsync) gets a
:class:`~gateway.routing.ModelStatus` in the table: routable, or why not (modelsync's refusal,
the backends' load error, a failing source, a placement no backend matches, still loading).

When a version's content is replaced (a new servable for the same model version), routing keeps
using the old servable until the new one is AVAILABLE on a backend; the old one is forgotten once
every reachable backend the model is placed on has settled on the new one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.catalog import DesiredModel, Servable, refusal_text
from gateway.fleet.desired import Desired
from gateway.fleet.report import Report
from gateway.routing import (
    FAILED,
    LOADING,
    PENDING,
    REFUSED,
    SOURCE_FAILING,
    ModelStatus,
    Route,
    Table,
    Target,
)
from gateway.transport import END, VersionStatus


@dataclass(frozen=True, slots=True)
class Built:
    table: Table
    # labels in force: a label moves only once its new target is AVAILABLE on every reachable
    # backend the model is placed on (the input of the next build)
    effective: Mapping[str, Mapping[str, int]]
    # Desired.previous less the contents every backend has moved on from
    previous: Mapping[tuple[str, int], Servable]
    # (model, label, version) of the labels that moved in this build
    moves: tuple[tuple[str, str, int], ...] = ()


def build(
    desired: Desired,
    reports: Sequence[Report],
    effective: Mapping[str, Mapping[str, int]],
    now: float,
) -> Built:
    routes: dict[str, Route] = {}
    labels_now: dict[str, dict[str, int]] = {m: dict(v) for m, v in effective.items()}
    moves: list[tuple[str, str, int]] = []
    for name, model in desired.models.items():
        versions = {}
        for version, current in model.versions.items():
            targets = _targets(desired, reports, model, version, current)
            if targets:
                versions[version] = tuple(targets)
        if versions:
            labels = _move_labels(desired, reports, name, versions, labels_now, moves)
            routes[name] = Route(
                name, versions, labels, dict(desired.splits.get(name, {})), api=model.api
            )
    previous = {
        key: old
        for key, old in desired.previous.items()
        if not _moved_on(desired, reports, key, now)
    }
    configured = {name: frozenset(model.versions) for name, model in desired.models.items()}
    known = (
        frozenset(desired.models)
        | frozenset(desired.expected)
        | frozenset(desired.problems.refused)
    )
    failed = _failed_versions(desired, reports, routes)
    states = {name: _status(desired, reports, name, name in routes, failed) for name in known}
    table = Table(
        routes=routes, known=known, configured=configured, states=states, failed_versions=failed
    )
    return Built(table, labels_now, previous, tuple(moves))


def version_states(
    desired: Desired, reports: Sequence[Report], name: str
) -> dict[int, list[tuple[Report, VersionStatus]]]:
    """Each version of a model and its state on every backend it is placed on."""
    model = desired.models[name]
    out: dict[int, list[tuple[Report, VersionStatus]]] = {}
    for version, current in sorted(model.versions.items()):
        old = desired.previous.get((name, version))
        entries = []
        for report in reports:
            if not model.placed_on(report.config):
                continue
            status = report.status.get(current, {}).get(version)
            if old is not None and not report.available(current, version):
                status = report.status.get(old.name, {}).get(version) or status
            if status is not None:
                entries.append((report, status))
        out[version] = entries
    return out


def _targets(
    desired: Desired, reports: Sequence[Report], model: DesiredModel, version: int, current: str
) -> list[Target]:
    old = desired.previous.get((model.name, version))
    # Only a backend this gateway configures (specific versions), holding the config last
    # pushed, cannot load a newer version on its own; the versions it serves are those its
    # last status poll reported in any state but END (a version a push is about to unload
    # stays there until a poll after the push).
    newest = desired.manage and version >= max(model.versions, default=0)
    targets = []
    for report in reports:
        for servable in (current, old.name if old is not None else None):
            if servable is not None and report.available(servable, version):
                known = report.reported.get(servable, {})
                served = (v for v, st in known.items() if st.state != END)
                top = newest and report.pushed and version >= max(served, default=0)
                targets.append(Target(report.endpoint, servable, top))
                break
    return targets


def _placed(desired: Desired, reports: Sequence[Report], model: str) -> list[Report]:
    """The reachable backends the model is placed on."""
    wanted = desired.models[model]
    return [r for r in reports if wanted.placed_on(r.config) and r.reachable]


def _move_labels(
    desired: Desired,
    reports: Sequence[Report],
    name: str,
    versions: Mapping[int, Sequence[Target]],
    labels_now: dict[str, dict[str, int]],
    moves: list[tuple[str, str, int]],
) -> dict[str, int]:
    effective = labels_now.setdefault(name, {})
    reachable = {r.name for r in _placed(desired, reports, name)}
    asked = desired.labels.get(name, {})
    for label, version in asked.items():
        holders = {t.backend.name for t in versions.get(version, ())}
        if label not in effective or (holders and reachable <= holders):
            if effective.get(label) != version:
                moves.append((name, label, version))
            effective[label] = version
    for label in [lb for lb in effective if lb not in asked]:
        del effective[label]
    return dict(effective)


def _moved_on(
    desired: Desired, reports: Sequence[Report], key: tuple[str, int], now: float
) -> bool:
    """Every reachable backend holding the model has settled on the version's new content."""
    placed = _placed(desired, reports, key[0])
    current = desired.models[key[0]].versions[key[1]]
    return bool(placed) and all(
        r.settled(current, key[1], now=now, hold=desired.hold) for r in placed
    )


def _failed_versions(
    desired: Desired, reports: Sequence[Report], routes: Mapping[str, Route]
) -> dict[tuple[str, int], str]:
    """Versions that are not routable and will not be by waiting: refused by modelsync and not
    published, or failed to load on every reachable backend they are placed on."""
    out: dict[tuple[str, int], str] = {}
    for name, versions in desired.problems.refused.items():
        published = desired.models[name].versions if name in desired.models else {}
        for version, reason in versions.items():
            if version is not None and version not in published:
                out[(name, version)] = f"modelsync refused version {version}: {reason}"
    for name, model in desired.models.items():
        route = routes.get(name)
        placed = _placed(desired, reports, name)
        for version, servable in model.versions.items():
            if placed and (route is None or version not in route.versions):
                errors = [r.load_errors.get((servable, version)) for r in placed]
                if all(errors):
                    out[(name, version)] = (
                        f"version {version} failed to load on {placed[0].name}: {errors[0]}"
                    )
    return out


def _status(
    desired: Desired,
    reports: Sequence[Report],
    name: str,
    routed: bool,
    failed: Mapping[tuple[str, int], str],
) -> ModelStatus:
    """Whether the model can be called, and if not, why not."""
    if routed:
        return ModelStatus("AVAILABLE")
    problems = desired.problems
    model = desired.models.get(name)
    if model is None or not model.versions:
        refused = problems.refused.get(name)
        if refused:
            return ModelStatus(REFUSED, refusal_text(refused))
        expected = desired.expected.get(name)
        if expected is not None:
            error = problems.source_errors.get((expected.api, expected.uri))
            if error:
                return ModelStatus(SOURCE_FAILING, f"its source {expected.uri} fails: {error}")
        return ModelStatus(PENDING, "modelsync has published no version of it yet")
    if not any(model.placed_on(b) for b in desired.backend_configs):
        return ModelStatus(FAILED, f"no configured backend can hold it: {_placement(model)}")
    errors = [failed[(name, v)] for v in sorted(model.versions) if (name, v) in failed]
    if len(errors) == len(model.versions):
        return ModelStatus(FAILED, errors[-1])
    placed = [r for r in reports if model.placed_on(r.config)]
    reachable = [r.name for r in placed if r.reachable]
    loading = [str(v) for v in sorted(model.versions) if (name, v) not in failed]
    if reachable:
        what = f"version{'s' if len(loading) > 1 else ''} {', '.join(loading)}"
        return ModelStatus(LOADING, f"{what} loading on {', '.join(reachable)}")
    if not placed:
        return ModelStatus(LOADING, "waiting for its backends to be discovered")
    down = "; ".join(f"{r.name} ({r.last_error or 'not reached yet'})" for r in placed)
    return ModelStatus(LOADING, f"no backend that can hold it is reachable: {down}")


def _placement(model: DesiredModel) -> str:
    if model.inferentia:
        return (
            f"API {model.api!r} runs on Inferentia (compute.inf > 0) and no backend has "
            "accelerator: inferentia"
        )
    if model.gpu_only:
        return (
            f"API {model.api!r} asks for GPUs (compute.gpu > 0) and no backend has accelerator: gpu"
        )
    return "no backend has accelerator: cpu or gpu"

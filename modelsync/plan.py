"""What a fresh listing means for a source's published versions (pure; no I/O).

A valid version that is not published is ADDED. One that is published with another digest is
STRUCTURE_CHANGED when its set of file paths differs, else CONTENT_UPDATED (same paths, a file
rewritten in place). A published version missing from the listing is removed. A version that
fails validation is rejected and its last good content, if any, stays published.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from modelsync.events import EventKind
from modelsync.layout import Candidate, Grouping, Problem, validate
from modelsync.state import Published


@dataclass(frozen=True, slots=True)
class Change:
    candidate: Candidate
    kind: EventKind
    reason: str
    previous: Published | None


@dataclass(slots=True)
class Plan:
    publish: list[Change] = field(default_factory=list)
    remove: list[Published] = field(default_factory=list)
    rejected: list[Problem] = field(default_factory=list)
    # Changed (or invalid) versions with a file younger than the settle time: judged next tick.
    settling: list[Candidate] = field(default_factory=list)
    unchanged: int = 0


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def classify(cand: Candidate, old: Published | None) -> Change | None:
    """The change from ``old`` to ``cand``; None when the content is the same."""
    if old is None:
        return Change(cand, EventKind.VERSION_ADDED, "new version at the source", None)
    if old.digest == cand.digest:
        return None
    added = sorted(set(cand.files) - set(old.files))
    removed = sorted(set(old.files) - set(cand.files))
    if added or removed:
        parts = []
        if added:
            parts.append(f"files added: {_names(added)}")
        if removed:
            parts.append(f"files removed: {_names(removed)}")
        return Change(cand, EventKind.STRUCTURE_CHANGED, "; ".join(parts), old)
    rewritten = sorted(
        path
        for path, info in cand.files.items()
        if (info.size, info.etag) != (old.files[path].size, old.files[path].etag)
    )
    return Change(cand, EventKind.CONTENT_UPDATED, f"rewritten in place: {_names(rewritten)}", old)


def make_plan(
    grouping: Grouping,
    *,
    published: Mapping[tuple[str, int], Published],
    inferentia: bool,
    savedmodel: bool = True,
    owner: Callable[[str], str | None],
    source_id: str,
    young_after: float | None = None,
) -> Plan:
    """``published`` holds this source's versions only; ``owner`` names a model's source.
    ``savedmodel`` is False for a source whose versions may hold any files (python handlers).

    A version changed after ``young_after`` (source clock) may still be uploading: it is neither
    published nor rejected yet, but left to settle.
    """
    plan = Plan(rejected=list(grouping.problems))
    for key, cand in sorted(grouping.candidates.items()):
        other = owner(cand.model)
        if other is not None and other != source_id:
            reason = f"model {cand.model!r} is already published from source {other!r}"
            plan.rejected.append(Problem(cand.model, cand.version, reason))
            continue
        young = young_after is not None and cand.modified > young_after
        problems = cand.problems + validate(
            cand.files, inferentia=inferentia, savedmodel=savedmodel
        )
        change = None if problems else classify(cand, published.get(key))
        if young and (problems or change is not None):
            plan.settling.append(cand)
        elif problems:
            plan.rejected.append(Problem(cand.model, cand.version, "; ".join(problems)))
        elif change is None:
            plan.unchanged += 1
        else:
            plan.publish.append(change)
    for key, old in sorted(published.items()):
        if key not in grouping.candidates:
            plan.remove.append(old)
    return plan

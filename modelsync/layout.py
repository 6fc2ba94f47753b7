"""From a source listing to models and versions: hostile keys, version folders, SavedModel layouts.

Everything here is pure: a listing (relative key -> :class:`ObjectInfo`) goes in, candidates and
problems come out. Nothing touches the disk or the network.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from modelmux_common.config import NAME_RE

# Canonical decimal integers only ("7", not "07"): the view folder is named str(version), so two
# source folders can never map onto one version.
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,17})$")
_SHARD_RE = re.compile(r"^variables\.data-(\d{5})-of-(\d{5})$")
_MAX_SEGMENT_BYTES = 255


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One file at a source."""

    size: int
    # S3: the object's ETag without quotes. Local: the file's sha256 (hex).
    etag: str
    # Local files only: st_mtime_ns when the sha256 was taken (a cache key, not content).
    mtime_ns: int = 0
    # Last modification on the source's clock (seconds since the epoch); 0 when unknown. Not
    # content: it only delays publishing a version that is still being written.
    modified: float = 0.0


@dataclass(frozen=True, slots=True)
class Problem:
    """Something refused. ``model`` is empty when the key names no valid model."""

    model: str
    version: int | None
    reason: str


@dataclass(slots=True)
class Candidate:
    """One version as the source has it now."""

    model: str
    version: int
    # Relative source key prefix of the version's files: "m/1/", "m/", "1/" or "".
    prefix: str
    # Path inside the version -> object.
    files: dict[str, ObjectInfo] = field(default_factory=dict)
    # Refused keys that belong to this version; any makes the version invalid.
    problems: list[str] = field(default_factory=list)

    def key(self, path: str) -> str:
        return self.prefix + path

    @property
    def digest(self) -> str:
        return content_digest(self.files.items())

    @property
    def total_bytes(self) -> int:
        return sum(info.size for info in self.files.values())

    @property
    def modified(self) -> float:
        return max((info.modified for info in self.files.values()), default=0.0)


@dataclass(slots=True)
class Grouping:
    """A listing split into versions, plus what belongs to none."""

    candidates: dict[tuple[str, int], Candidate] = field(default_factory=dict)
    # Refused keys that belong to no version (bad model names, hostile version segments).
    problems: list[Problem] = field(default_factory=list)
    # Harmless keys outside any version folder (e.g. a README next to version folders).
    ignored: list[str] = field(default_factory=list)


def content_digest(files: Iterable[tuple[str, ObjectInfo]]) -> str:
    """sha256 over the sorted (path, ETag or sha256, size) entries of a version."""
    h = hashlib.sha256()
    for path, info in sorted(files, key=lambda item: item[0]):
        h.update(f"{path}\0{info.etag}\0{info.size}\n".encode())
    return h.hexdigest()


def hostile_reason(rel: str) -> str:
    """Why a relative key could escape or confuse the target tree; empty when it is safe."""
    if "\\" in rel:
        return "contains a backslash"
    if rel.startswith("/"):
        return "is an absolute path"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "contains a control character"
    try:
        rel.encode()
    except UnicodeEncodeError:  # a local file name that is not UTF-8 (a surrogate escape)
        return "is not valid UTF-8"
    parts = rel.split("/")
    if any(p in (".", "..") for p in parts):
        return "has a '.' or '..' segment"
    if "" in parts:
        return "has an empty path segment"
    if any(len(p.encode()) > _MAX_SEGMENT_BYTES for p in parts):
        return f"has a segment longer than {_MAX_SEGMENT_BYTES} bytes"
    return ""


def is_folder_marker(rel: str, info: ObjectInfo) -> bool:
    """Zero-byte keys ending in '/' are folder placeholders (S3 consoles create them)."""
    return (rel == "" or rel.endswith("/")) and info.size == 0


@dataclass(slots=True)
class _Entry:
    rest: list[str]
    info: ObjectInfo
    reason: str
    rel: str


def group(listing: Mapping[str, ObjectInfo], *, model: str | None) -> Grouping:
    """Splits a listing into versions.

    ``model`` is the model name of a ``path`` source; ``None`` for a ``dir`` source, whose
    top-level folders are models. A model with no integer folders is version 1.
    """
    out = Grouping()
    entries: dict[str, list[_Entry]] = defaultdict(list)
    bad_names: dict[str, int] = defaultdict(int)
    for rel in sorted(listing):
        info = listing[rel]
        if is_folder_marker(rel, info):
            continue
        parts = rel.split("/")
        reason = hostile_reason(rel)
        if model is not None:
            entries[model].append(_Entry(parts, info, reason, rel))
        elif len(parts) == 1 and not reason:
            out.ignored.append(rel)
        elif not NAME_RE.match(parts[0]):
            bad_names[parts[0]] += 1
        else:
            entries[parts[0]].append(_Entry(parts[1:], info, reason, rel))
    for name, count in sorted(bad_names.items()):
        out.problems.append(
            Problem("", None, f"refused {count} key(s) under {name!r}: not a valid model name")
        )
    for name, items in entries.items():
        _group_model(out, name, items, in_dir=model is None)
    return out


def _is_version_folder(rest: list[str]) -> bool:
    return len(rest) > 1 and bool(VERSION_RE.match(rest[0]))


def _group_model(out: Grouping, name: str, items: list[_Entry], *, in_dir: bool) -> None:
    base = f"{name}/" if in_dir else ""
    versioned = any(_is_version_folder(e.rest) for e in items)
    for e in items:
        if versioned and _is_version_folder(e.rest):
            version, segment, path = int(e.rest[0]), e.rest[0], "/".join(e.rest[1:])
            prefix = f"{base}{segment}/"
        elif versioned:
            if e.reason:
                out.problems.append(Problem(name, None, f"refused key {e.rel!r}: {e.reason}"))
            else:
                out.ignored.append(e.rel)
            continue
        else:
            version, path, prefix = 1, "/".join(e.rest), base
        cand = out.candidates.get((name, version))
        if cand is None:
            cand = out.candidates[(name, version)] = Candidate(name, version, prefix)
        if e.reason:
            cand.problems.append(f"refused key {e.rel!r}: {e.reason}")
        else:
            cand.files[path] = e.info


def validate(
    files: Mapping[str, ObjectInfo], *, inferentia: bool, savedmodel: bool = True
) -> list[str]:
    """Layout problems of one version; empty when it can be published.

    CPU/GPU: ``saved_model.pb``, plus ``variables/variables.index`` and every data shard when
    ``variables/`` exists. Inferentia: ``saved_model.pb`` only, so any ``variables/`` is refused.
    Not a SavedModel (a python handler's model): any files, as long as there is one.
    """
    if not savedmodel:
        return [] if files else ["the version folder holds no files"]
    problems: list[str] = []
    graph = files.get("saved_model.pb")
    if graph is None:
        problems.append("no saved_model.pb at the top of the version folder")
    elif graph.size == 0:
        problems.append("saved_model.pb is empty")
    variables = sorted(p for p in files if p.startswith("variables/"))
    if inferentia:
        if variables:
            problems.append(
                "the Inferentia layout is saved_model.pb only (a compiled model has no "
                f"variables/), but variables/ holds {len(variables)} file(s)"
            )
    elif variables:
        problems.extend(_check_variables(variables))
    return problems


def _check_variables(paths: list[str]) -> list[str]:
    names = {p[len("variables/") :] for p in paths}
    problems: list[str] = []
    if "variables.index" not in names:
        problems.append("variables/ has no variables.index")
    shards: dict[int, set[int]] = defaultdict(set)
    for n in names:
        match = _SHARD_RE.match(n)
        if match:
            shards[int(match.group(2))].add(int(match.group(1)))
    if len(shards) > 1:
        counts = ", ".join(str(total) for total in sorted(shards))
        problems.append(f"variables/ mixes data shard sets of different sizes ({counts})")
    for total, present in shards.items():
        missing = sorted(set(range(total)) - present)
        if missing:
            shown = ", ".join(f"variables.data-{i:05d}-of-{total:05d}" for i in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            problems.append(f"variables/ is missing data shard(s) {shown}{more}")
    return problems

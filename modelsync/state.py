"""What is published, persisted as ``<target>/.modelsync/state.json``.

Written atomically (temporary file, fsync, rename, fsync of the folder) after every event, so the
revision counter never goes back and a restart knows which source objects each published version
came from: nothing unchanged is downloaded again. Paths inside are relative to the target, so the
volume may be mounted elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsync.layout import ObjectInfo, content_digest

FORMAT = 1


class StateError(Exception):
    """The state file exists but cannot be used; the daemon refuses to guess."""


@dataclass(frozen=True, slots=True)
class FileRecord:
    # Source key relative to the source URI.
    key: str
    size: int
    etag: str
    mtime_ns: int = 0

    @property
    def info(self) -> ObjectInfo:
        return ObjectInfo(self.size, self.etag, self.mtime_ns)


@dataclass(frozen=True, slots=True)
class Published:
    """One published version: its immutable store folder and the source objects it came from."""

    model: str
    version: int
    api: str
    inferentia: bool
    source_id: str
    source_uri: str
    revision: int
    digest: str
    # Relative to the target: ".store/<model>/r<revision>/<version>".
    store: str
    files: Mapping[str, FileRecord]
    published_at: float

    @property
    def store_base(self) -> str:
        return self.store.rsplit("/", 1)[0]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def infos(self) -> dict[str, ObjectInfo]:
        return {path: rec.info for path, rec in self.files.items()}

    def check_digest(self) -> bool:
        return content_digest(self.infos().items()) == self.digest


@dataclass(frozen=True, slots=True)
class PendingRemoval:
    """A store folder (``.store/<model>/r<revision>``) deleted once ``due`` (unix time) has passed.

    For a removed version, ``model``/``version`` name its view link, which goes at the same time
    (unless the version was published again meanwhile and the link points elsewhere).
    """

    path: str
    due: float
    model: str = ""
    version: int | None = None

    @property
    def view_target(self) -> str:
        """The store folder the view link of a removed version points at."""
        return f"{self.path}/{self.version}"


@dataclass(slots=True)
class State:
    revision: int = 0
    published: dict[tuple[str, int], Published] = field(default_factory=dict)
    pending: list[PendingRemoval] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "revision": self.revision,
            "published": [_published_json(p) for _, p in sorted(self.published.items())],
            "pending_removals": [
                {"path": r.path, "due": r.due, "model": r.model, "version": r.version}
                for r in self.pending
            ],
        }

    @classmethod
    def from_json(cls, raw: Any) -> State:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise StateError(f"unknown state format (expected format {FORMAT})")
        published = [_published_from(p) for p in raw.get("published", [])]
        return cls(
            revision=int(raw["revision"]),
            published={(p.model, p.version): p for p in published},
            pending=[_pending_from(r) for r in raw["pending_removals"]],
        )


def _pending_from(raw: dict[str, Any]) -> PendingRemoval:
    version = raw.get("version")
    return PendingRemoval(
        path=str(raw["path"]),
        due=float(raw["due"]),
        model=str(raw.get("model", "")),
        version=None if version is None else int(version),
    )


def _published_json(p: Published) -> dict[str, Any]:
    return {
        "model": p.model,
        "version": p.version,
        "api": p.api,
        "inferentia": p.inferentia,
        "source_id": p.source_id,
        "source_uri": p.source_uri,
        "revision": p.revision,
        "digest": p.digest,
        "store": p.store,
        "published_at": p.published_at,
        "files": {
            path: {"key": f.key, "size": f.size, "etag": f.etag, "mtime_ns": f.mtime_ns}
            for path, f in sorted(p.files.items())
        },
    }


def _published_from(raw: dict[str, Any]) -> Published:
    files = {
        str(path): FileRecord(str(f["key"]), int(f["size"]), str(f["etag"]), int(f["mtime_ns"]))
        for path, f in raw["files"].items()
    }
    return Published(
        model=str(raw["model"]),
        version=int(raw["version"]),
        api=str(raw["api"]),
        inferentia=bool(raw["inferentia"]),
        source_id=str(raw["source_id"]),
        source_uri=str(raw["source_uri"]),
        revision=int(raw["revision"]),
        digest=str(raw["digest"]),
        store=str(raw["store"]),
        files=files,
        published_at=float(raw["published_at"]),
    )


def load(path: Path) -> State:
    """The saved state; an empty one when there is none yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return State()
    try:
        return State.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"{path}: {exc}") from exc


def save(path: Path, state: State) -> None:
    """Atomic replace: a reader (or a restart after a crash) sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    data = json.dumps(state.to_json(), indent=1, sort_keys=True).encode()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

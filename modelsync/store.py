"""The target tree on disk.

::

    <target>/<model>/<version>            -> ../.store/<model>/r<revision>/<version>  (the view)
    <target>/.store/<model>/r<revision>/<version>/...   immutable published content
    <target>/.staging/<model>-<version>-<random>/...    downloads in progress (cleared at start)
    <target>/.modelsync/state.json                      what is published (see state.py)

Staging and store are on one filesystem, so publishing is a rename; the view symlink is swapped
with a rename too. A reader of ``<target>/<model>/<version>`` sees the old or the new content,
never a mix, and a killed process leaves only staging litter behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from modelsync.layout import VERSION_RE
from modelsync.state import fsync_dir

log = structlog.get_logger("modelsync.store")

STORE = ".store"
STAGING = ".staging"
META = ".modelsync"


class ViewOccupied(OSError):
    """``<target>/<model>/<version>`` is a real folder or file modelsync did not create."""


class Store:
    def __init__(self, target: Path) -> None:
        self.target = target
        self.store = target / STORE
        self.staging = target / STAGING
        self.state_path = target / META / "state.json"

    def prepare(self) -> int:
        """Creates the folders and clears staging litter; returns how many entries it removed."""
        for folder in (self.target, self.store, self.staging, self.state_path.parent):
            folder.mkdir(parents=True, exist_ok=True)
        litter = list(self.staging.iterdir())
        for entry in litter:
            _remove(entry)
        return len(litter)

    @staticmethod
    def store_rel(model: str, revision: int, version: int) -> str:
        return f"{STORE}/{model}/r{revision}/{version}"

    def path(self, rel: str) -> Path:
        return self.target / rel

    def new_staging(self, model: str, version: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{model}-{version}-", dir=self.staging))

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def commit(self, staged: Path, rel: str) -> None:
        """Makes the staged files durable, then renames the folder into the store."""
        for dirpath, _, filenames in os.walk(staged):
            for name in filenames:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        final = self.path(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, final)
        fsync_dir(final.parent)

    def view(self, model: str, version: int) -> Path:
        return self.target / model / str(version)

    def check_view(self, model: str, version: int) -> None:
        """Raises :class:`ViewOccupied` when the view path holds something modelsync did not make."""
        folder = self.target / model
        link = folder / str(version)
        if (folder.exists() or folder.is_symlink()) and (
            folder.is_symlink() or not folder.is_dir()
        ):
            raise ViewOccupied(f"{folder} exists and is not a folder modelsync created")
        if link.exists() and not link.is_symlink():
            raise ViewOccupied(f"{link} exists and was not created by modelsync")

    def point(self, model: str, version: int, rel: str) -> None:
        """Atomically points the view of (model, version) at the store folder ``rel``."""
        self.check_view(model, version)
        link = self.view(model, version)
        link.parent.mkdir(exist_ok=True)
        tmp = link.with_name(f".{version}.{secrets.token_hex(4)}.tmp")
        os.symlink(f"../{rel}", tmp)
        try:
            os.replace(tmp, link)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(link.parent)

    def unpoint(self, model: str, version: int, rel: str) -> None:
        """Removes the view link of (model, version) if it still points at ``rel``."""
        link = self.view(model, version)
        if link.is_symlink() and os.readlink(link) == f"../{rel}":
            link.unlink()
            fsync_dir(link.parent)
        with contextlib.suppress(OSError):  # not empty, or not there
            link.parent.rmdir()

    def delete(self, rel: str) -> None:
        """Deletes a store folder and its model folder when that becomes empty."""
        path = self.path(rel)
        if self.store not in path.parents:
            raise ValueError(f"refusing to delete {path}: not inside {self.store}")
        _remove(path)
        if path.parent != self.store:
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    def reconcile(self, wanted: Mapping[tuple[str, int], str]) -> list[str]:
        """Makes the views match ``wanted`` ((model, version) -> store rel) after a restart.

        ``wanted`` holds the published versions and the removed ones still in their grace period.
        Other view symlinks (a crash mid-publish or mid-removal) and temporary links go; anything
        that is not a symlink is left alone. Returns what it changed.
        """
        changed: list[str] = []
        for folder in sorted(self.target.iterdir()):
            if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                if not entry.is_symlink():
                    continue
                key = (folder.name, int(entry.name)) if VERSION_RE.match(entry.name) else None
                if key is None or key not in wanted:
                    entry.unlink()
                    changed.append(f"removed stale link {entry}")
                elif os.readlink(entry) != f"../{wanted[key]}":
                    self.point(key[0], key[1], wanted[key])
                    changed.append(f"repointed {entry}")
            with contextlib.suppress(OSError):
                folder.rmdir()
        for (model, version), rel in sorted(wanted.items()):
            if not self.view(model, version).is_symlink():
                self.point(model, version, rel)
                changed.append(f"restored link {self.view(model, version)}")
        return changed

    def orphans(self, keep: Iterable[str]) -> list[str]:
        """Store base folders (``.store/<model>/r<N>``) nothing refers to: a crash mid-publish."""
        kept = set(keep)
        found: list[str] = []
        for model_dir in sorted(self.store.iterdir()):
            if not model_dir.is_dir() or model_dir.is_symlink():
                found.append(f"{STORE}/{model_dir.name}")
                continue
            for base in sorted(model_dir.iterdir()):
                rel = f"{STORE}/{model_dir.name}/{base.name}"
                if rel not in kept:
                    found.append(rel)
        return found


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)

"""Model sources: a small blocking interface with an S3 and a local-folder implementation.

A source lists its files (relative key -> :class:`ObjectInfo`) and copies one file into a staging
path, verifying it. Both calls block; the sync loop runs them in threads. The S3 implementation is
in :mod:`modelsync.s3`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelsync.layout import ObjectInfo

CHUNK_BYTES = 1024 * 1024
Objects = dict[str, ObjectInfo]
OnBytes = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Listing:
    """Every file under a source, by key relative to it."""

    objects: Objects
    # The source's clock when it was listed (comparable with ObjectInfo.modified); None if unknown.
    now: float | None = None


class SourceError(Exception):
    """The source cannot be listed or read: network, permissions, a missing bucket or folder."""


class TransferStalled(SourceError):
    """No byte arrived for the stall timeout; the transfer is retried (resuming when it can)."""


class SourceChanged(Exception):
    """An object changed or vanished between listing and download: not an error, list again."""


class Aborted(Exception):
    """The daemon is shutting down; the partial file stays in staging, cleared at the next start."""


class Source(ABC):
    """Where one API's models come from."""

    uri: str

    @abstractmethod
    def list(self) -> Listing:
        """Every file under the source, by key relative to it. Raises :class:`SourceError`."""

    @abstractmethod
    def fetch(self, key: str, info: ObjectInfo, dest: Path, *, progress: Transfer) -> None:
        """Writes the file ``key`` (as listed with ``info``) to ``dest`` and verifies it.

        Continues a partial ``dest`` left by an earlier attempt when the source allows it.
        Raises :class:`SourceError`, :class:`SourceChanged` or :class:`Aborted`.
        """


class Transfer:
    """What a running fetch reports to and reads from its owner (thread-safe)."""

    def __init__(self, *, on_bytes: OnBytes, abort: threading.Event) -> None:
        self._on_bytes = on_bytes
        self._abort = abort

    def received(self, count: int) -> None:
        self._on_bytes(count)

    def check(self) -> None:
        if self._abort.is_set():
            raise Aborted("shutting down")


def sha256_file(path: Path, *, abort: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            if abort is not None and abort.is_set():
                raise Aborted("shutting down")
            h.update(chunk)
    return h.hexdigest()


class LocalSource(Source):
    """A local folder. Change detection by sha256, cached by (st_mtime_ns, size).

    Directory symlinks are not followed; a file symlink is read through (local sources are the
    operator's own folders).
    """

    def __init__(self, root: str, *, abort: threading.Event | None = None) -> None:
        self.uri = root
        self.root = Path(root)
        self._abort = abort
        self._known: Objects = {}

    def prime(self, known: Objects) -> None:
        """Seeds the sha256 cache (e.g. from the saved state) so a restart does not rehash."""
        self._known = dict(known)

    def list(self) -> Listing:
        if not self.root.is_dir():
            raise SourceError(f"{self.root} is not a folder")
        now = time.time()
        found: Objects = {}
        errors: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=errors.append):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                rel = path.relative_to(self.root).as_posix()
                info = self._describe(path, rel)
                if info is not None:
                    found[rel] = info
        if errors:
            raise SourceError(f"cannot read {errors[0].filename}: {errors[0].strerror}")
        self._known = found
        return Listing(found, now)

    def _describe(self, path: Path, rel: str) -> ObjectInfo | None:
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                return None
            known = self._known.get(rel)
            if known and known.mtime_ns == st.st_mtime_ns and known.size == st.st_size:
                return dataclasses.replace(known, modified=st.st_mtime)
            digest = sha256_file(path, abort=self._abort)
            return ObjectInfo(st.st_size, digest, st.st_mtime_ns, st.st_mtime)
        except FileNotFoundError:  # removed while listing (or a dangling symlink)
            return None
        except PermissionError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror}") from exc

    def fetch(self, key: str, info: ObjectInfo, dest: Path, *, progress: Transfer) -> None:
        h = hashlib.sha256()
        size = 0
        try:
            with open(self.root / key, "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(CHUNK_BYTES):
                    progress.check()
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    progress.received(len(chunk))
        except FileNotFoundError as exc:
            raise SourceChanged(f"{key} vanished") from exc
        except PermissionError as exc:
            raise SourceError(f"cannot read {key}: {exc.strerror}") from exc
        if size != info.size or h.hexdigest() != info.etag:
            raise SourceChanged(f"{key} changed while it was copied")

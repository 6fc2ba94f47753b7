"""Model lifecycle with TF Serving's semantics: config, version folders, loads, unloads, routing.

All bookkeeping happens on the event loop; TensorFlow work (loading, releasing) runs on an executor
so status and inference calls keep answering while a model loads. Each model has one lock: at most
one reconciliation runs per model and at most one more waits behind it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from backend import servable as servables
from backend.errors import FailedPrecondition, NotFound, ServingError
from backend.metrics import LOAD_SECONDS
from backend.modelconfig import ModelSpec
from backend.servable import LoadError, Servable
from backend.tfserving import get_model_status_pb2
from modelmux_common.config import Accelerator

log = structlog.get_logger("modelmux.backend")

_State = get_model_status_pb2.ModelVersionStatus.State
START = _State.Value("START")
LOADING = _State.Value("LOADING")
AVAILABLE = _State.Value("AVAILABLE")
UNLOADING = _State.Value("UNLOADING")
END = _State.Value("END")


@dataclass(slots=True)
class VersionRecord:
    """One version's state as GetModelStatus reports it; ``servable`` is set while AVAILABLE."""

    version: int
    path: Path
    state: int = START
    error: ServingError | None = None
    servable: Servable | None = None
    # Whether the current policy wants this version; a failed load is not retried while it stays
    # aspired (TF Serving does the same), only once it has left the aspired set and come back.
    aspired: bool = True

    @property
    def state_name(self) -> str:
        return str(_State.Name(self.state))


@dataclass(slots=True)
class ModelRecord:
    name: str
    spec: ModelSpec | None  # None once the model has been removed from the config
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    base_path_missing: bool = False

    def available(self) -> list[int]:
        return sorted(v for v, r in self.versions.items() if r.state == AVAILABLE)

    def available_text(self) -> str:
        return ", ".join(str(v) for v in self.available()) or "none"


def scan_versions(base_path: Path) -> dict[int, Path] | None:
    """Integer-named folders under ``base_path``; ``None`` when the base path cannot be listed."""
    try:
        entries = list(os.scandir(base_path))
    except OSError:
        return None
    found: dict[int, Path] = {}
    for entry in entries:
        if entry.name.isascii() and entry.name.isdigit() and entry.is_dir():
            version = int(entry.name)
            if version not in found or entry.name == str(version):
                found[version] = Path(entry.path)
    return found


class ModelManager:
    """Owns every model's versions. Public methods are called from the event loop only."""

    def __init__(self, *, accelerator: Accelerator, executor: Executor) -> None:
        self._accelerator: Accelerator = accelerator
        self._executor = executor
        self._models: dict[str, ModelRecord] = {}
        self._config_lock = asyncio.Lock()
        self._queued: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- configuration -------------------------------------------------------------------------

    async def apply(self, specs: list[ModelSpec]) -> None:
        """Replaces the whole config, like TF Serving's HandleReloadConfigRequest.

        Returns once models with new names have finished loading (or failed); new versions of
        known models load in the background. Labels are checked last, against AVAILABLE versions,
        and raise FAILED_PRECONDITION (the model config stays applied, the old labels stay).
        """
        async with self._config_lock:
            touched = {spec.name for spec in specs}
            new_names: list[str] = []
            for spec in specs:
                model = self._models.get(spec.name)
                if model is None or model.spec is None:
                    new_names.append(spec.name)
                if model is None:
                    model = self._models[spec.name] = ModelRecord(spec.name, spec)
                model.spec = spec
            for name, model in self._models.items():
                if name not in touched and model.spec is not None:
                    model.spec, model.labels = None, {}
                    touched.add(name)
                    log.info("model removed from config", model=name)
            tasks = {name: self._schedule(name) for name in touched}
            waited = [tasks[name] for name in new_names]
            if waited:
                await asyncio.wait(waited)
            self._set_labels(specs)

    def _set_labels(self, specs: list[ModelSpec]) -> None:
        for spec in specs:
            model = self._models[spec.name]
            for label, version in spec.labels.items():
                record = model.versions.get(version)
                if record is None or record.state != AVAILABLE:
                    state = "absent" if record is None else record.state_name
                    raise FailedPrecondition(
                        f"version label {label!r} of model {spec.name!r} points at version "
                        f"{version}, which is not AVAILABLE ({state}); available versions: "
                        f"{model.available_text()}"
                    )
        for spec in specs:
            self._models[spec.name].labels = dict(spec.labels)

    def rescan(self) -> None:
        """Schedules a re-scan of every configured model's base path (the file system poll)."""
        for name, model in self._models.items():
            if model.spec is not None:
                self._schedule(name)

    async def poll(self, interval: float, stop: asyncio.Event) -> None:
        """Re-scans every ``interval`` seconds until ``stop`` is set (an interruptible wait)."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
            except TimeoutError:
                self.rescan()

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- reconciliation ------------------------------------------------------------------------

    def _schedule(self, name: str) -> asyncio.Task[None]:
        task = self._queued.get(name)
        if task is None:
            task = asyncio.create_task(self._reconcile(name), name=f"reconcile {name}")
            self._queued[name] = task
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "model reconciliation failed; the next poll retries",
                task=task.get_name(),
                exc_info=task.exception(),
            )

    async def _reconcile(self, name: str) -> None:
        model = self._models[name]
        async with model.lock:
            if self._queued.get(name) is asyncio.current_task():
                del self._queued[name]
            await self._sync(model)

    async def _desired(self, model: ModelRecord) -> dict[int, Path] | None:
        spec = model.spec
        if spec is None:
            return {}
        found = await asyncio.to_thread(scan_versions, spec.base_path)
        if found is None:
            if not model.base_path_missing:
                log.warning(
                    "base path cannot be listed; keeping what is loaded",
                    model=model.name,
                    base_path=str(spec.base_path),
                )
            model.base_path_missing = True
            return None
        model.base_path_missing = False
        return spec.policy.select(found)

    async def _sync(self, model: ModelRecord) -> None:
        desired = await self._desired(model)
        if desired is None:
            return
        to_load = [v for v, path in desired.items() if self._needs_load(model, v, path)]
        for record in model.versions.values():
            record.aspired = record.version in desired
        for version in to_load:
            model.versions[version] = VersionRecord(version, desired[version], state=LOADING)
        await asyncio.gather(*(self._load(model.name, model.versions[v]) for v in to_load))
        # Keep serving the old versions until a wanted one is AVAILABLE (no gap), unless nothing
        # is wanted any more (model removed, or every version folder gone).
        if desired and not any(v in desired for v in model.available()):
            return
        for record in list(model.versions.values()):
            if record.version not in desired and record.state == AVAILABLE:
                await self._unload(model.name, record)

    @staticmethod
    def _needs_load(model: ModelRecord, version: int, path: Path) -> bool:
        record = model.versions.get(version)
        if record is None:
            return True
        return record.state == END and (not record.aspired or record.path != path)

    async def _load(self, name: str, record: VersionRecord) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        job = functools.partial(
            servables.load,
            model=name,
            version=record.version,
            path=record.path,
            accelerator=self._accelerator,
        )
        try:
            record.servable = await loop.run_in_executor(self._executor, job)
        except LoadError as exc:
            record.error = exc
        except Exception as exc:
            # A SavedModel can make the loader fail in many ways; each one is a failed version
            # (END with the reason), never a crashed backend.
            record.error = LoadError(f"{type(exc).__name__}: {exc}", code=grpc.StatusCode.UNKNOWN)
        seconds = round(time.monotonic() - started, 3)
        LOAD_SECONDS.labels("failed" if record.error else "loaded").observe(seconds)
        if record.error is None:
            record.state = AVAILABLE
            log.info(
                "version loaded", model=name, version=record.version, seconds=seconds, error=None
            )
        else:
            record.state = END
            log.warning(
                "version load failed",
                model=name,
                version=record.version,
                seconds=seconds,
                error=record.error.message,
            )

    async def _unload(self, name: str, record: VersionRecord) -> None:
        started = time.monotonic()
        record.state = UNLOADING
        servable, record.servable = record.servable, None
        await asyncio.get_running_loop().run_in_executor(self._executor, _release, servable)
        record.state = END
        seconds = round(time.monotonic() - started, 3)
        log.info(
            "version unloaded", model=name, version=record.version, seconds=seconds, error=None
        )

    # -- queries -------------------------------------------------------------------------------

    def _configured(self, name: str) -> ModelRecord:
        model = self._models.get(name)
        if model is None or model.spec is None:
            raise NotFound(f"model {name!r} not found; models: {self._names()}")
        return model

    def _names(self) -> str:
        return ", ".join(sorted(n for n, m in self._models.items() if m.spec)) or "none"

    def resolve(self, name: str, *, version: int | None, label: str | None) -> Servable:
        """The servable for (name, version | label | latest); NOT_FOUND naming what is missing."""
        model = self._configured(name)
        if label is not None:
            if label not in model.labels:
                labels = ", ".join(sorted(model.labels)) or "none"
                raise NotFound(f"model {name!r} has no version label {label!r}; labels: {labels}")
            version = model.labels[label]
            record = model.versions.get(version)
            if record is None or record.servable is None or record.state != AVAILABLE:
                raise NotFound(
                    f"version label {label!r} of model {name!r} points at version {version}, "
                    f"which is not available; available: {model.available_text()}"
                )
            return record.servable
        if version is None:
            available = model.available()
            if not available:
                raise NotFound(f"model {name!r} has no available version{_states(model)}")
            version = available[-1]
        record = model.versions.get(version)
        if record is None or record.servable is None or record.state != AVAILABLE:
            raise NotFound(
                f"model {name!r} has no version {version}; available: {model.available_text()}"
                + (f" (version {version} is {record.state_name})" if record else "")
            )
        return record.servable

    def state_counts(self) -> dict[str, int]:
        """Versions of every model by state name (the metrics' model versions gauge)."""
        counts: dict[str, int] = {}
        for model in self._models.values():
            for record in model.versions.values():
                counts[record.state_name] = counts.get(record.state_name, 0) + 1
        return counts

    def status(self, name: str, version: int | None) -> list[VersionRecord]:
        """Version records for GetModelStatus (removed models keep their END records)."""
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} not found; models: {self._names()}")
        if version is not None:
            record = model.versions.get(version)
            if record is None:
                known = ", ".join(str(v) for v in sorted(model.versions)) or "none"
                raise NotFound(f"model {name!r} has no version {version}; versions: {known}")
            return [record]
        if not model.versions:
            where = f" under {model.spec.base_path}" if model.spec else ""
            raise NotFound(f"model {name!r} has no versions{where}")
        return [model.versions[v] for v in sorted(model.versions)]


def _states(model: ModelRecord) -> str:
    if not model.versions:
        return " (no version folders found)" if model.spec else ""
    parts = [f"{v}: {r.state_name}" for v, r in sorted(model.versions.items())]
    return " (" + ", ".join(parts) + ")"


def _release(servable: Servable | None) -> None:
    """Drops the last reference on a worker thread; a loaded SavedModel holds reference cycles."""
    del servable
    gc.collect()

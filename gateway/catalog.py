"""Which models the gateway serves, where their files are, and on which backends they belong.

A *servable* is one entry of a backend's ModelServerConfig. Read from local folders (no modelsync),
a model is one servable named after it that holds all its versions. Followed from modelsync, every
published content of a version is its own servable, ``<model>@r<revision>``, whose base path is
modelsync's immutable store folder holding just that version. Rewriting a version in place then
publishes a new servable that loads beside the old one, and routing switches only once it is
AVAILABLE: no request ever meets a version that is being swapped.

What modelsync refuses (and sources that fail) reaches the pool as :class:`Problems`, so that a
model the config names is listed, and its calls answered, with the reason it cannot be served.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from modelmux_common.config import NAME_RE, BackendConfig, Config, ConfigError


@dataclass(frozen=True, slots=True)
class Servable:
    """One entry of a backend's model config."""

    name: str
    base_path: str
    versions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DesiredModel:
    """A model as the backends should load it."""

    name: str
    api: str
    inferentia: bool
    # version -> name of the servable that serves it now
    versions: Mapping[int, str]
    servables: Mapping[str, Servable]
    # the API asks for GPUs (compute.gpu > 0): GPU backends only
    gpu_only: bool = False

    def placed_on(self, backend: BackendConfig) -> bool:
        """Inferentia APIs go to Inferentia backends only, APIs that ask for GPUs to GPU backends
        only, all others to GPU and CPU backends."""
        if self.inferentia or backend.accelerator == "inferentia":
            return self.inferentia and backend.accelerator == "inferentia"
        return backend.accelerator == "gpu" or not self.gpu_only


@dataclass(frozen=True, slots=True)
class Problems:
    """What modelsync reports against models it does not publish (or not every version of)."""

    # model -> version (None: the model as a whole) -> why modelsync refuses it
    refused: Mapping[str, Mapping[int | None, str]] = field(default_factory=dict)
    # model -> its API, for the models refused
    apis: Mapping[str, str] = field(default_factory=dict)
    # (api, source uri) -> the error of a source that fails now
    source_errors: Mapping[tuple[str, str], str] = field(default_factory=dict)


def refusal_text(refused: Mapping[int | None, str]) -> str:
    """What modelsync refuses of one model, as calls for it and listings say it; versions refused
    for the same reason are named together."""
    by_reason: dict[str, list[int | None]] = {}
    for version, reason in sorted(refused.items(), key=lambda item: item[0] or 0):
        by_reason.setdefault(reason, []).append(version)
    parts = []
    for reason, versions in by_reason.items():
        numbers = [str(v) for v in versions if v is not None]
        what = [f"version{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}"] if numbers else []
        if None in versions:
            what.insert(0, "it")
        parts.append(f"modelsync refused {' and '.join(what)}: {reason}")
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Expected:
    """A model the config names (a path source): it is listed even before anything is published."""

    api: str
    uri: str


def expected_models(config: Config) -> dict[str, Expected]:
    """The models the config's path sources name for the backends (python handlers' are not)."""
    return {
        s.name: Expected(s.api, s.uri)
        for s in config.sources()
        if s.kind == "path" and s.savedmodel
    }


def gpu_apis(config: Config) -> frozenset[str]:
    """APIs whose compute asks for GPUs."""
    return frozenset(api.name for api in config.apis if _positive(api.compute.get("gpu", 0)))


def _positive(value: object) -> bool:
    try:
        return float(str(value)) > 0
    except ValueError:
        return False


def single_servable(
    name: str, api: str, inferentia: bool, base_path: str, versions: tuple[int, ...], gpu_only: bool
) -> DesiredModel:
    servable = Servable(name, base_path, versions)
    return DesiredModel(
        name, api, inferentia, {v: name for v in versions}, {name: servable}, gpu_only
    )


def version_folders(path: str) -> tuple[int, ...]:
    """Integer-named subfolders of ``path``, ascending."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return ()
    return tuple(
        sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir(follow_symlinks=True))
    )


def static_catalog(config: Config) -> Mapping[str, DesiredModel]:
    """Models read straight from local folders (no modelsync): each must hold version folders.
    Python handlers' sources are not SavedModels for the backends: they are left out."""
    models: dict[str, DesiredModel] = {}
    gpu = gpu_apis(config)
    for source in config.sources():
        if not source.savedmodel:
            continue
        key = f"apis[{source.api}].models"
        if source.kind == "path":
            found = [(source.name, source.uri)]
        else:
            try:
                children = sorted(e.name for e in os.scandir(source.uri) if e.is_dir())
            except OSError as exc:
                raise ConfigError(
                    config.file, key, f"cannot list {source.uri}: {exc.strerror}"
                ) from None
            found = [(c, os.path.join(source.uri, c)) for c in children if NAME_RE.match(c)]
        for name, path in found:
            versions = version_folders(path)
            if not versions:
                raise ConfigError(
                    config.file,
                    key,
                    f"{path} has no integer version folders (serve unversioned models through modelsync)",
                )
            if name in models:
                raise ConfigError(config.file, key, f"model {name!r} is defined twice")
            models[name] = single_servable(
                name, source.api, source.inferentia, path, versions, source.api in gpu
            )
    return models

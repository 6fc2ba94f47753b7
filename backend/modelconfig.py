"""TF Serving's ModelServerConfig, validated into frozen model specs.

Validation names the offending entry and field precisely, because the gateway (and operators using
grpcurl) see these messages as the INVALID_ARGUMENT of HandleReloadConfigRequest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from google.protobuf import text_format

from backend.errors import InvalidArgument
from backend.tfserving import model_server_config_pb2
from modelmux_common.config import ConfigError

PolicyKind = Literal["latest", "all", "specific"]
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_PLATFORMS = ("", "tensorflow")


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which of the version folders found under a base path should be served."""

    kind: PolicyKind = "latest"
    num_latest: int = 1
    specific: frozenset[int] = frozenset()

    def select(self, found: Mapping[int, Path]) -> dict[int, Path]:
        if self.kind == "all":
            chosen = list(found)
        elif self.kind == "specific":
            chosen = [v for v in found if v in self.specific]
        else:
            chosen = sorted(found, reverse=True)[: self.num_latest]
        return {v: found[v] for v in sorted(chosen)}

    def describe(self) -> str:
        if self.kind == "specific":
            return "specific " + ", ".join(str(v) for v in sorted(self.specific))
        return "all" if self.kind == "all" else f"latest {self.num_latest}"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One validated ``model_config_list.config[]`` entry."""

    name: str
    base_path: Path
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: Mapping[str, int] = field(default_factory=dict)


def parse_config(config: model_server_config_pb2.ModelServerConfig) -> list[ModelSpec] | None:
    """Validates a whole config; ``None`` means the config is empty (TF Serving takes no action).

    Raises :class:`InvalidArgument` naming the entry, the field and the reason.
    """
    which = config.WhichOneof("config")
    if which is None:
        return None
    if which == "custom_model_config":
        raise InvalidArgument(
            "custom_model_config is not supported; send a model_config_list of tensorflow models"
        )
    specs: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(config.model_config_list.config):
        spec = _parse_entry(index, entry)
        if spec.name in seen:
            raise InvalidArgument(
                f"model_config_list.config[{index}]: duplicate model name {spec.name!r} "
                f"(also config[{seen[spec.name]}])"
            )
        seen[spec.name] = index
        specs.append(spec)
    return specs


def _parse_entry(index: int, entry: model_server_config_pb2.ModelConfig) -> ModelSpec:
    where = f"model_config_list.config[{index}]"
    if not entry.name:
        raise InvalidArgument(f"{where}: name is empty")
    where = f"{where} (model {entry.name!r})"
    if not entry.base_path:
        raise InvalidArgument(f"{where}: base_path is empty")
    if _SCHEME_RE.match(entry.base_path) and not entry.base_path.startswith("file://"):
        raise InvalidArgument(
            f"{where}: base_path {entry.base_path!r} is not a local folder; "
            "this backend reads local (or mounted) folders only"
        )
    if entry.model_platform not in _PLATFORMS:
        raise InvalidArgument(
            f"{where}: model_platform {entry.model_platform!r} is not supported; "
            "this backend serves 'tensorflow' models only"
        )
    if entry.model_type == model_server_config_pb2.OTHER:
        raise InvalidArgument(f"{where}: model_type OTHER is not supported; use tensorflow")
    base_path = Path(entry.base_path.removeprefix("file://"))
    return ModelSpec(
        name=entry.name,
        base_path=Path(os.path.abspath(base_path)),
        policy=_parse_policy(where, entry),
        labels=_parse_labels(where, entry),
    )


def _parse_policy(where: str, entry: model_server_config_pb2.ModelConfig) -> VersionPolicy:
    policy = entry.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy(kind="all")
    if which == "specific":
        versions = list(policy.specific.versions)
        if not versions:
            raise InvalidArgument(
                f"{where}: model_version_policy.specific lists no versions; list at least one"
            )
        negative = [v for v in versions if v < 0]
        if negative:
            raise InvalidArgument(
                f"{where}: model_version_policy.specific has negative version {negative[0]}"
            )
        return VersionPolicy(kind="specific", specific=frozenset(versions))
    # Unset and latest{} both mean "latest"; num_versions 0 (proto default) means 1, as in TF Serving.
    count = policy.latest.num_versions if which == "latest" else 1
    return VersionPolicy(kind="latest", num_latest=max(1, count))


def _parse_labels(where: str, entry: model_server_config_pb2.ModelConfig) -> dict[str, int]:
    labels: dict[str, int] = {}
    for label, version in sorted(entry.version_labels.items()):
        if not label:
            raise InvalidArgument(f"{where}: version_labels has an empty label")
        if version < 0:
            raise InvalidArgument(
                f"{where}: version_labels[{label!r}] points at negative version {version}"
            )
        labels[label] = version
    return labels


def read_config_file(path: str) -> list[ModelSpec] | None:
    """Reads and validates a ModelServerConfig in protobuf text format (``--model-config-file``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "--model-config-file", f"cannot read: {exc.strerror}") from exc
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(path, "ModelServerConfig", f"not a text-format config: {exc}") from exc
    try:
        return parse_config(config)
    except InvalidArgument as exc:
        raise ConfigError(path, "model_config_list", exc.message) from exc

"""Reading the file: YAML, then the environment and command-line layers, every rule on the way."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from modelmux_common.config import rules
from modelmux_common.config.fields import ConfigError, Context, Layers, key_of, read, spec_of
from modelmux_common.config.schema import ApiConfig, Config, Document

Daemon = Literal["gateway"]


def load(
    path: str | os.PathLike[str] | None,
    *,
    daemon: Daemon | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Reads and checks a config file; ``None`` gives the defaults (plus environment).

    ``overrides`` are command-line flags by section (``{"gateway": {"listen": ...}}``; a None value
    is a flag not given): they win over the environment, which wins over the file. ``daemon``
    also runs that daemon's rules about the whole file (:mod:`.rules`)."""
    if path is None:
        ctx = Context("<defaults>", Path.cwd())
        raw: Any = {}
    else:
        file = str(path)
        ctx = Context(file, Path(file).resolve().parent)
        try:
            with open(file, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(file, "<file>", exc.strerror or str(exc)) from None
        except yaml.YAMLError as exc:
            raise ConfigError(file, "<file>", f"not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(file, "<file>", f"not UTF-8 text: {exc}") from None
        except RecursionError:  # PyYAML composes nested collections recursively
            raise ConfigError(file, "<file>", "collections nested too deeply") from None
    doc: Document = read(Document, raw, "", ctx, _layers(overrides or {}))
    config = Config(
        file=ctx.file,
        gateway=doc.gateway,
        modelsync=doc.modelsync,
        backends=doc.backends,
        apis=tuple(ApiConfig.of(api) for api in doc.apis),
        version_labels=doc.version_labels,
    )
    if daemon == "gateway":
        for check in rules.GATEWAY_RULES:
            check(config, ctx)
    return config


def _layers(overrides: Mapping[str, Mapping[str, Any]]) -> Layers:
    """MODELMUX_<SECTION>_<KEY> for the sections that take them, then the flags over them."""
    layers: Layers = {}
    for f in dataclasses.fields(Document):
        spec = spec_of(f)
        if not spec.env or spec.section is None:
            continue
        section = key_of(f)
        layer = layers.setdefault(section, {})
        for key in (key_of(k) for k in dataclasses.fields(spec.section) if not _is_section(k)):
            env = os.environ.get(f"MODELMUX_{section.upper()}_{key.upper()}")
            if env is not None:
                layer[key] = env
    for section, flags in overrides.items():
        layers.setdefault(section, {}).update((k, v) for k, v in flags.items() if v is not None)
    return layers


def _is_section(f: dataclasses.Field[Any]) -> bool:
    """A section inside a section (``gateway.tls``) takes no environment variable."""
    return spec_of(f).section is not None

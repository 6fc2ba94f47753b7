"""How a config key is declared: its kind (parsing and coercion), default, range and meaning.

Every key of the file is a dataclass field declared with :func:`setting`; the loader reads a
section by walking its fields, and ``scripts/gen_config_docs.py`` writes docs/config.md from the
same declarations, so the two cannot drift. Rules between keys are :mod:`.rules`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# \Z, not $: "$" also matches before a final newline, which would let "name\n" through
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1} | {
    f"{p}{i}B": (1024 if i else 1000) ** (n + 1) for n, p in enumerate("KMGT") for i in ("", "i")
}
_DNS_RE = re.compile(r"^dns:(///)?[A-Za-z0-9.\-\[\]:]+:\d+$")
META = "modelmux"


class ConfigError(ValueError):
    """A config file that cannot be used: names the file, the key and the reason."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file, self.key, self.reason = file, key, reason


@dataclass(frozen=True, slots=True)
class Context:
    """What parsing a value needs besides the value: the file (for errors and relative paths)."""

    file: str
    base: Path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.file, key, reason)


@dataclass(frozen=True, slots=True)
class Kind:
    """A value's type in the file: its name in docs/config.md and its parser.

    ``parse(value, key, ctx)`` returns the coerced value, raises ``ValueError`` for a bad value
    (reported at ``key``) or a :class:`ConfigError` naming a key below it."""

    name: str
    parse: Callable[[Any, str, Context], Any]
    show: Callable[[Any], str] = repr
    # what a required key of this kind wants, for the error when it is missing
    expect: str = ""


@dataclass(frozen=True, slots=True)
class Range:
    """The smallest value a number may take; ``message`` is the error."""

    low: float
    exclusive: bool
    message: str

    def check(self, value: float) -> None:
        if value < self.low or (self.exclusive and value == self.low):
            raise ValueError(self.message)

    def __str__(self) -> str:
        low = int(self.low) if self.low == int(self.low) else self.low
        return f"{'>' if self.exclusive else '≥'} {low}"


POSITIVE = Range(1, False, "must be positive")
MORE_THAN_ZERO = Range(0, True, "must be more than zero")


@dataclass(frozen=True, slots=True)
class Spec:
    """One key's declaration (the metadata of its dataclass field)."""

    kind: Kind
    doc: str
    range: Range | None = None
    required: bool = False
    # for a section given as a key: what an empty mapping there means (an error), if not "defaults"
    empty: str = ""
    # docs/config.md's default column when the field's own default does not say it
    default_doc: str = ""
    # for a list of sections: keys an item gets when it does not set them, from its index
    item_defaults: Callable[[int], dict[str, Any]] | None = None
    # MODELMUX_<SECTION>_<KEY> environment variables apply to this section's keys
    env: bool = False
    # the field is a section (a dataclass read key by key), or a list of them
    section: type | None = None
    many: bool = False
    # the key in the file when it is not the field's name (a Python keyword such as "async")
    key: str = ""


def setting(kind: Kind, doc: str, default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A config key: a dataclass field whose metadata is its :class:`Spec`."""
    meta = {META: Spec(kind=kind, doc=doc, required=default is dataclasses.MISSING, **spec)}
    if isinstance(default, dict | list):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str, *, default: Any = None, many: bool = False, **spec: Any) -> Any:
    """A key holding a section (``cls``'s fields), or with ``many`` a list of them."""
    kind = SECTIONS if many else SECTION
    meta = {META: Spec(kind=kind, doc=doc, section=cls, many=many, **spec)}
    if default is None:
        return dataclasses.field(default=() if many else None, metadata=meta)
    return dataclasses.field(default_factory=default, metadata=meta)


def spec_of(f: dataclasses.Field[Any]) -> Spec:
    spec = f.metadata.get(META)
    if not isinstance(spec, Spec):
        raise TypeError(f"config field {f.name} is not declared with setting() or section()")
    return spec


def key_of(f: dataclasses.Field[Any]) -> str:
    """The field's key in the file."""
    return spec_of(f).key or f.name


# --- kinds -----------------------------------------------------------------------------------


def parse_duration(value: Any) -> float:
    """``10``, ``2.5``, ``"500ms"``, ``"10s"``, ``"5m"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s or 500ms")
    if isinstance(value, int | float):
        seconds = float(value) if abs(value) < 1e300 else math.inf  # (a huge int: no float)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 10s or 500ms")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if not math.isfinite(seconds):  # .inf or .nan in YAML, or more digits than a float holds
        raise ValueError("a duration is a finite number of seconds")
    return seconds


def _show_duration(seconds: Any) -> str:
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds else "0"


def parse_size(value: Any) -> int:
    """``1048576``, ``"64MiB"``, ``"1.5GB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes such as 1048576 or 64MiB")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size such as 1048576, 512KiB or 64MiB")
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not math.isfinite(size):  # more digits than a float holds
        raise ValueError("the size has more digits than a number holds")
    return int(size)


def _show_size(size: Any) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def _integer(value: Any, key: str, ctx: Context) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError("expected an integer")  # int(.inf) would raise OverflowError
    return int(value)


def _boolean(value: Any, key: str, ctx: Context) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _string(value: Any, key: str, ctx: Context) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return str(value)


def _folder(value: Any, key: str, ctx: Context) -> str:
    text = _string(value, key, ctx)
    return str((ctx.base / text).resolve()) if text else text


def _name(value: Any, key: str, ctx: Context) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid name (letters, digits, '_', '.', '-')")
    return value


def _uri(value: Any, key: str, ctx: Context) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected an s3:// URI or a folder path")
    if value.startswith("s3://"):
        if not value[5:].split("/", 1)[0]:
            raise ValueError(f"{value!r} has no bucket")
        return value if value.endswith("/") else value + "/"
    if "://" in value:
        raise ValueError(f"{value!r}: only s3:// URIs and local folders are supported")
    return str((ctx.base / value).resolve())


def _address(value: Any, key: str, ctx: Context) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("required: host:port, dns:///name:port or unix:path")
    if value.startswith("dns:") and not _DNS_RE.match(value):
        raise ValueError(f"{value!r} is not dns:///name:port")
    return value


def _http_address(value: Any, key: str, ctx: Context) -> str:
    if not isinstance(value, str):
        raise ValueError("expected host:port (empty: off)")
    _, sep, port = value.rpartition(":")
    if value and (not sep or not port.isdigit() or int(port) > 65535):
        raise ValueError(f"{value!r} is not host:port or [v6]:port")
    return value


def _mapping(value: Any, key: str, ctx: Context) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("expected a mapping")
    return dict(value)


def _scalar(value: Any, key: str, ctx: Context) -> Any:
    if isinstance(value, dict | list):
        raise ValueError(f"expected a number or a string, got {type(value).__name__}")
    return value


def _labels(value: Any, key: str, ctx: Context) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for model, labels in mapping(value, key, None, ctx).items():
        mkey = f"{key}.{model}"
        _at(_name, model, mkey, ctx)
        out[model] = {}
        for label, version in mapping(labels, mkey, None, ctx).items():
            _at(_name, label, f"{mkey}.{label}", ctx)
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise ctx.fail(f"{mkey}.{label}", "a label points at an integer version")
            out[model][label] = version
    return out


def choice(*values: str) -> Kind:
    """One of ``values``."""
    shown = ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]

    def parse(value: Any, key: str, ctx: Context) -> str:
        if value not in values:
            raise ValueError(f"{value!r} is not {shown}")
        return str(value)

    return Kind(" \\| ".join(f"`{v}`" for v in values), parse)


def file(suffix: str) -> Kind:
    """An existing ``suffix`` file named relative to the config file; empty when not given."""

    def parse(value: Any, key: str, ctx: Context) -> str:
        if value is None or value == "":
            return ""
        if not isinstance(value, str):
            raise ValueError("expected a file path")
        path = (ctx.base / value).resolve()
        if path.suffix != suffix:
            raise ValueError(f"{value!r} is not a {suffix} file")
        try:
            exists = path.is_file()
        except OSError as exc:  # e.g. a name longer than the file system takes
            raise ValueError(f"{path}: {exc.strerror}") from None
        if not exists:
            raise ValueError(f"{path} does not exist")
        return str(path)

    return Kind(f"{suffix} file", parse)


def _existing_file(value: Any, key: str, ctx: Context) -> str:
    """A file named relative to the config file that exists now (its content is checked by the
    section's rules); empty when not given."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError("expected a file path")
    path = (ctx.base / value).resolve()
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    return str(path)


def _at(parse: Callable[[Any, str, Context], Any], value: Any, key: str, ctx: Context) -> Any:
    try:
        return parse(value, key, ctx)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ctx.fail(key, str(exc)) from None


DURATION = Kind("duration", lambda v, k, c: parse_duration(v), _show_duration)
SIZE = Kind("size", lambda v, k, c: parse_size(v), _show_size)
INTEGER = Kind("integer", _integer, str)
BOOLEAN = Kind("boolean", _boolean, lambda v: str(v).lower())
STRING = Kind("string", _string)
FOLDER = Kind("folder", _folder)
NAME = Kind("name", _name, expect="a name (letters, digits, '_', '.', '-')")
URI = Kind("s3:// URI or folder", _uri, expect="an s3:// URI or a folder path")
ADDRESS = Kind("address", _address, expect="host:port, dns:///name:port or unix:path")
HTTP_ADDRESS = Kind("address", _http_address, expect="host:port or [v6]:port; empty: off")
MAPPING = Kind("mapping", _mapping, lambda v: "{}")
SCALAR = Kind("number or string", _scalar)
FILE = Kind("file", _existing_file)
LABELS = Kind("mapping", _labels, lambda v: "{}")
SECTION = Kind("section", lambda v, k, c: v)
SECTIONS = Kind("list", lambda v, k, c: v)


# --- reading a section -----------------------------------------------------------------------


def mapping(value: Any, key: str, allowed: set[str] | None, ctx: Context) -> dict[str, Any]:
    """``value`` as a mapping whose keys are all in ``allowed`` (any keys when None)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.fail(key or "<file>", f"expected a mapping, got {type(value).__name__}")
    for k in value:
        if allowed is not None and k not in allowed:
            shown = str(k) or repr(k)  # an empty key, shown as ''
            raise ctx.fail(
                f"{key}.{shown}" if key else shown,
                f"unknown key (known: {', '.join(sorted(allowed))})",
            )
    return dict(value)


Layers = dict[str, dict[str, Any]]
Rule = Callable[[Any, str, Context], None]
# section class -> the rules its instances must follow, run as each one is read (.rules)
RULES: dict[type, list[Rule]] = {}


def rule(cls: type) -> Callable[[Rule], Rule]:
    """Declares ``fn(instance, key, ctx)`` a rule of the section ``cls``: it raises
    :class:`ConfigError` (``ctx.fail``) for an instance that breaks it. Its docstring's first
    line is the rule in docs/config.md."""

    def register(fn: Rule) -> Rule:
        RULES.setdefault(cls, []).append(fn)
        return fn

    return register


def read(cls: type, value: Any, key: str, ctx: Context, layers: Layers | None = None) -> Any:
    """An instance of the section ``cls`` from the file's ``value`` at ``key``.

    ``layers`` maps a section's key to values that win over the file's (the environment and
    command-line flags, in that order)."""
    fields = dataclasses.fields(cls)
    raw = mapping(value, key, {key_of(f) for f in fields}, ctx)
    raw.update((layers or {}).get(key, {}))
    out: dict[str, Any] = {}
    for f in fields:
        spec, name = spec_of(f), key_of(f)
        fkey = f"{key}.{name}" if key else name
        if name in raw:
            out[f.name] = read_value(spec, raw[name], fkey, ctx, layers)
        elif spec.required:
            raise ctx.fail(
                fkey, f"required: {spec.kind.expect}" if spec.kind.expect else "required"
            )
        elif spec.section is not None and f.default_factory is not dataclasses.MISSING:
            out[f.name] = read(spec.section, None, fkey, ctx, layers)  # its rules and layers too
    instance = cls(**out)
    for check in RULES.get(cls, ()):
        check(instance, key, ctx)
    return instance


def read_value(spec: Spec, value: Any, key: str, ctx: Context, layers: Layers | None) -> Any:
    if spec.section is None:
        parsed = _at(spec.kind.parse, value, key, ctx)
        if spec.range is not None and parsed is not None:
            try:
                spec.range.check(parsed)
            except ValueError as exc:
                raise ctx.fail(key, str(exc)) from None
        return parsed
    if spec.empty and not value:
        raise ctx.fail(key, spec.empty)
    if not spec.many:
        return read(spec.section, value, key, ctx, layers)
    if value is None:
        return ()
    if not isinstance(value, list) or (spec.empty and not value):
        raise ctx.fail(key, spec.empty or "expected a list")
    items = []
    for i, item in enumerate(value):
        if spec.item_defaults is not None and isinstance(item, dict):
            item = {**spec.item_defaults(i), **item}
        items.append(read(spec.section, item, f"{key}[{i}]", ctx, layers))
    return tuple(items)

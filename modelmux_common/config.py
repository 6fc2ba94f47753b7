"""One YAML file configures every modelmux daemon.

The file is a mapping with the sections ``gateway``, ``modelsync``, ``backends``, ``version_labels``
and ``apis`` (a list of Cortex-style API specs). Values are layered: defaults < YAML < environment
(``MODELMUX_<SECTION>_<KEY>``, e.g. ``MODELMUX_GATEWAY_LISTEN``) < CLI flags (applied by the caller
with :func:`dataclasses.replace`). A bad file fails at start with the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Seconds = float
Accelerator = Literal["cpu", "gpu", "inferentia"]
ACCELERATORS: tuple[Accelerator, ...] = ("cpu", "gpu", "inferentia")

# \Z, not $: "$" also matches before a final newline, which would let "name\n" through
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DNS_RE = re.compile(r"^dns:(///)?[A-Za-z0-9.\-\[\]:]+:\d+$")
# durations for which 0 means "none" rather than a busy loop or an instant deadline
_MAY_BE_ZERO = {"removal_grace", "settle", "debounce", "shutdown_grace", "batch_interval"}
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(ValueError):
    """A config file that cannot be used: names the file, the key and the reason."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file, self.key, self.reason = file, key, reason


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: str = "127.0.0.1:8500"
    # Largest request or response message accepted, in bytes.
    max_message_bytes: int = 64 * 1024 * 1024
    # Keep freed memory (up to 4 x max_message_bytes) for reuse instead of returning it to the
    # kernel at once: large messages then cost about half the CPU (docs/benchmarks.md), at the
    # price of a resident size that stays near its peak after large calls.
    reuse_freed_memory: bool = True
    # Upper bound of every backend call; the caller's own deadline wins when it is shorter.
    backend_timeout: Seconds = 30.0
    # False for a gateway that only routes (e.g. a sidecar beside a shared pool): it watches the
    # backends' model status and leaves their configuration to the one gateway that manages them.
    manage_backends: bool = True
    # Gateway processes sharing the listening port (SO_REUSEPORT); each keeps its own routing state.
    workers: int = 1
    # modelsync's address; empty means a static catalogue read from local model folders.
    modelsync: str = ""
    # How often dns:///name:port backends are re-resolved.
    dns_refresh: Seconds = 10.0
    # Upper bound of a config push that loads new servables (TF Serving answers it after they load).
    load_timeout: Seconds = 600.0
    # How often each backend's model status is polled once it has converged.
    status_interval: Seconds = 2.0
    # Calls in flight through the gateway at once (the seeds' max_replica_concurrency); past it a
    # call fails at once with RESOURCE_EXHAUSTED. Nothing is queued.
    max_inflight: int = 1024
    # Calls in flight to one backend at once; a backend at its limit is skipped by routing.
    backend_max_inflight: int = 256
    # Token the admin RPCs (SetVersionLabel, SetTrafficSplit) require as 'authorization: Bearer
    # <token>' metadata; empty leaves them open (bind to loopback then).
    admin_token: str = ""
    # How long in-flight calls may finish after SIGTERM.
    shutdown_grace: Seconds = 10.0
    # Upper bound of a handler call (Invoke, user-defined services); the caller's deadline wins
    # when it is shorter.
    handler_timeout: Seconds = 60.0
    # How long a handler worker may take to import the handler file and run its __init__.
    handler_start_timeout: Seconds = 300.0
    # Where handler workers' sockets and the disk model caches live; empty means a fresh
    # temporary folder, removed at exit.
    runtime_dir: str = ""
    # One summary log line per request.
    log_requests: bool = True
    log_level: str = "info"
    # Durable state (the async APIs' embedded store: <state_dir>/async); relative to the config
    # file's folder.
    state_dir: str = ".modelmux/state"
    # host:port of the Prometheus /metrics HTTP endpoint (modelmux_common/metrics.py); empty: off.
    metrics_listen: str = ""


@dataclass(frozen=True, slots=True)
class ModelsyncConfig:
    listen: str = "127.0.0.1:8510"
    # The shared volume the backends read from: <target>/<model>/<version>/...
    target: str = "/mnt/models"
    poll_interval: Seconds = 10.0
    # How long a removed version stays on disk after its removal event.
    removal_grace: Seconds = 60.0
    download_concurrency: int = 8
    # S3 endpoint override (MinIO, moto); empty uses AWS.
    s3_endpoint_url: str = ""
    s3_region: str = ""
    # Attempts per S3 API call (botocore's standard retry mode), listings included.
    s3_max_attempts: int = 3
    log_level: str = "info"
    # Upper bound of the summed sizes of objects being downloaded at once (bytes).
    max_bytes_in_flight: int = 512 * 1024 * 1024
    # A transfer that receives no byte for this long fails (and is retried); no total time limit.
    stall_timeout: Seconds = 30.0
    # Attempts per file before a download fails (backoff doubles from 0.5 s between them).
    download_attempts: int = 4
    # Quiet time a local folder must have after a change before it is rescanned.
    debounce: Seconds = 0.5
    # A changed version whose newest file is younger than this (by the source's clock) is judged
    # on a later tick: an upload in progress is neither published half-done nor reported invalid.
    settle: Seconds = 2.0
    # How often a long transfer logs its progress.
    progress_interval: Seconds = 5.0
    # Events kept in memory for WatchEvents resumption.
    event_log_size: int = 10000


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    address: str
    accelerator: Accelerator = "cpu"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model (``kind="path"``) or a folder of models (``kind="dir"``) comes from."""

    api: str
    kind: Literal["path", "dir"]
    # Model name for kind="path"; empty for kind="dir" (names are the folder's children).
    name: str
    # s3://bucket/prefix/ or an absolute local folder.
    uri: str
    # True when the API runs on Inferentia (compute.inf > 0): validated by the Inferentia layout.
    inferentia: bool = False
    # SavedModels for the backends (tensorflow handlers); False for a python handler's
    # multi_model_reloading, whose versions may hold any files and never go to a backend.
    savedmodel: bool = True

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


# ---- an AsyncAPI's `async` section (docs/async.md) ----------------------------------------
ASYNC_STORES = ("embedded", "aws")


@dataclass(frozen=True, slots=True)
class AsyncConfig:
    # Where requests live: "embedded" (SQLite and files in `folder`) or "aws" (SQS + S3).
    store: str = "embedded"
    # embedded: the folder; empty means <gateway.state_dir>/async.
    folder: str = ""
    # aws: requests under s3://<bucket>/<prefix>/<api>/<id>/, queue <queue_prefix>async-<api>.
    bucket: str = ""
    prefix: str = "async"
    queue_prefix: str = "modelmux-"
    region: str = ""
    # S3 and SQS endpoint override (MinIO, LocalStack, moto); empty uses AWS.
    endpoint_url: str = ""
    # Runs of a request before it is FAILED (a handler error, a worker or gateway that died).
    max_attempts: int = 3
    # How long a received request stays hidden from other gateways; renewed while it runs.
    visibility_timeout: Seconds = 30.0
    # How long a result (or an error) is kept after the request ends.
    result_ttl: Seconds = 7 * 24 * 3600.0
    # Requests queued or running at once; past it Submit gets RESOURCE_EXHAUSTED.
    max_queued: int = 10000
    # Largest payload Submit accepts, in bytes.
    max_payload_bytes: int = 16 * 1024 * 1024
    # Upper bound of one handle_async call; past it the attempt fails.
    timeout: Seconds = 3600.0


def _async_section(
    reader: _Reader, value: Any, key: str, *, kind: str, handler_path: str
) -> AsyncConfig | None:
    if kind != "AsyncAPI":
        if value is not None:
            raise reader.fail(key, f"only a kind: AsyncAPI has an async section (this is a {kind})")
        return None
    if not handler_path:
        raise reader.fail(
            key.removesuffix(".async") + ".handler.path",
            "an AsyncAPI runs a handler's handle_async",
        )
    section: AsyncConfig = reader.section(AsyncConfig, value, key)
    if section.store not in ASYNC_STORES:
        raise reader.fail(f"{key}.store", f"{section.store!r} is not embedded or aws")
    if section.store == "aws" and not section.bucket:
        raise reader.fail(f"{key}.bucket", "store: aws needs the S3 bucket")
    return section


@dataclass(frozen=True, slots=True)
class ApiConfig:
    name: str
    kind: str
    handler_type: str
    handler_path: str
    signature_key: str
    sources: tuple[ModelSource, ...]
    compute: Mapping[str, Any]
    handler_config: Mapping[str, Any]
    processes_per_replica: int = 1
    threads_per_process: int = 1
    # absolute path of the user's .proto; empty when the API has no service of its own
    protobuf_path: str = ""
    # models kept loaded in memory / on local disk per worker; 0 = no limit (all loaded)
    cache_size: int = 0
    disk_cache_size: int = 0
    # server-side batching of Predict calls to the backends (gateway/batching.py); 0 = off
    max_batch_size: int = 0
    batch_interval: float = 0.0
    # kind: AsyncAPI only: its `async` section
    async_config: AsyncConfig | None = None

    @property
    def inferentia(self) -> bool:
        return _positive(self.compute.get("inf", 0))


@dataclass(frozen=True, slots=True)
class Config:
    file: str = "<defaults>"
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    modelsync: ModelsyncConfig = field(default_factory=ModelsyncConfig)
    backends: tuple[BackendConfig, ...] = ()
    apis: tuple[ApiConfig, ...] = ()
    # model -> label -> version
    version_labels: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def sources(self) -> tuple[ModelSource, ...]:
        return tuple(s for api in self.apis for s in api.sources)


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def parse_duration(value: Any) -> Seconds:
    """``10``, ``2.5``, ``"500ms"``, ``"10s"``, ``"5m"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s or 500ms")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 10s or 500ms")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


class _Reader:
    """Validates one file, naming the exact key of every problem."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.base = Path(file).resolve().parent if file != "<defaults>" else Path.cwd()

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.file, key, reason)

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                raise self.fail(
                    f"{key}.{k}" if key else str(k),
                    f"unknown key (known: {', '.join(sorted(allowed))})",
                )
        return value

    def section(self, cls: Any, value: Any, key: str) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        raw = dict(self.mapping(value, key, names))
        for name in names:
            env = os.environ.get(f"MODELMUX_{key.upper()}_{name.upper()}")
            if env is not None:
                raw[name] = env
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            out[f.name] = self.coerce(raw[f.name], f.type, f"{key}.{f.name}", f.name)
        return cls(**out)

    def coerce(self, value: Any, type_: Any, key: str, name: str) -> Any:
        try:
            if type_ == "Seconds":
                seconds = parse_duration(value)
                if seconds <= 0 and name not in _MAY_BE_ZERO:
                    raise ValueError("must be more than zero")
                return seconds
            if type_ == "bool":
                if isinstance(value, bool):
                    return value
                if str(value).lower() in ("1", "true", "yes", "on"):
                    return True
                if str(value).lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"expected true or false, got {value!r}")
            if type_ == "int":
                if isinstance(value, bool):
                    raise ValueError("expected an integer")
                number = int(value)
                if number <= 0:
                    raise ValueError("must be positive")
                return number
            if type_ == "str":
                if not isinstance(value, str | int | float) or isinstance(value, bool):
                    raise ValueError(f"expected a string, got {type(value).__name__}")
                text = str(value)
                if name in ("target", "runtime_dir", "state_dir", "folder"):
                    return str((self.base / text).resolve()) if text else text
                return text
        except (TypeError, ValueError) as exc:
            raise self.fail(key, str(exc)) from None
        raise self.fail(key, f"unsupported type {type_}")

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise self.fail(key, f"{value!r} is not a valid name (letters, digits, '_', '.', '-')")
        return value

    def uri(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "expected an s3:// URI or a folder path")
        if value.startswith("s3://"):
            bucket = value[5:].split("/", 1)[0]
            if not bucket:
                raise self.fail(key, f"{value!r} has no bucket")
            return value if value.endswith("/") else value + "/"
        if "://" in value:
            raise self.fail(key, f"{value!r}: only s3:// URIs and local folders are supported")
        return str((self.base / value).resolve())

    def backends(self, value: Any) -> tuple[BackendConfig, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail("backends", "expected a list")
        out: list[BackendConfig] = []
        for i, item in enumerate(value):
            key = f"backends[{i}]"
            raw = self.mapping(item, key, {"name", "address", "accelerator"})
            address = raw.get("address")
            if not isinstance(address, str) or not address:
                raise self.fail(
                    f"{key}.address", "required: host:port, dns:///name:port or unix:path"
                )
            if address.startswith("dns:") and not _DNS_RE.match(address):
                raise self.fail(f"{key}.address", f"{address!r} is not dns:///name:port")
            accel = raw.get("accelerator", "cpu")
            if accel not in ACCELERATORS:
                raise self.fail(
                    f"{key}.accelerator", f"{accel!r} is not one of {', '.join(ACCELERATORS)}"
                )
            name = self.name(raw.get("name", f"backend-{i}"), f"{key}.name")
            out.append(BackendConfig(name=name, address=address, accelerator=accel))
        seen: set[str] = set()
        for b in out:
            if b.name in seen:
                raise self.fail("backends", f"duplicate backend name {b.name!r}")
            seen.add(b.name)
        return tuple(out)

    def labels(self, value: Any) -> dict[str, dict[str, int]]:
        raw = self.mapping(value, "version_labels", set(value or ()))
        out: dict[str, dict[str, int]] = {}
        for model, labels in raw.items():
            key = f"version_labels.{model}"
            self.name(model, key)
            mapping = self.mapping(labels, key, set(labels or ()))
            out[model] = {}
            for label, version in mapping.items():
                self.name(label, f"{key}.{label}")
                if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                    raise self.fail(f"{key}.{label}", "a label points at an integer version")
                out[model][label] = version
        return out

    def apis(self, value: Any) -> tuple[ApiConfig, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail("apis", "expected a list of API specs")
        apis = tuple(self.api(item, f"apis[{i}]") for i, item in enumerate(value))
        names: set[str] = set()
        models: dict[str, str] = {}
        for api in apis:
            if api.name in names:
                raise self.fail("apis", f"duplicate API name {api.name!r}")
            names.add(api.name)
            for src in api.sources:
                if src.kind == "path":
                    if src.name in models:
                        raise self.fail(
                            "apis",
                            f"model {src.name!r} is defined by both {models[src.name]!r} and {api.name!r}",
                        )
                    models[src.name] = api.name
        return apis

    def api(self, item: Any, key: str) -> ApiConfig:
        raw = self.mapping(item, key, {"name", "kind", "handler", "compute", "async"})
        name = self.name(raw.get("name"), f"{key}.name")
        kind = raw.get("kind", "RealtimeAPI")
        if kind not in ("RealtimeAPI", "AsyncAPI", "BatchAPI"):
            raise self.fail(f"{key}.kind", f"{kind!r} is not RealtimeAPI, AsyncAPI or BatchAPI")
        compute = self.mapping(raw.get("compute"), f"{key}.compute", {"cpu", "gpu", "inf", "mem"})
        if _positive(compute.get("inf", 0)) and _positive(compute.get("gpu", 0)):
            raise self.fail(f"{key}.compute", "an API runs on either gpu or inf, not both")
        inferentia = _positive(compute.get("inf", 0))
        hkey = f"{key}.handler"
        handler = self.mapping(
            raw.get("handler"),
            hkey,
            {
                "type",
                "path",
                "models",
                "multi_model_reloading",
                "config",
                "processes_per_replica",
                "threads_per_process",
                "protobuf_path",
                "server_side_batching",
            },
        )
        htype = handler.get("type", "tensorflow")
        if htype not in ("tensorflow", "python"):
            raise self.fail(f"{hkey}.type", f"{htype!r} is not tensorflow or python")
        models_key = "models" if htype == "tensorflow" else "multi_model_reloading"
        other = "multi_model_reloading" if htype == "tensorflow" else "models"
        if other in handler:
            raise self.fail(
                f"{hkey}.{other}", f"not valid for a {htype} handler (use {models_key})"
            )
        mkey = f"{hkey}.{models_key}"
        models = self.mapping(
            handler.get(models_key),
            mkey,
            {"path", "paths", "dir", "signature_key", "cache_size", "disk_cache_size"},
        )
        given = [k for k in ("path", "paths", "dir") if k in models]
        if len(given) > 1:
            raise self.fail(mkey, f"give exactly one of path, paths, dir (got {', '.join(given)})")
        if htype == "tensorflow" and not given:
            raise self.fail(mkey, "a tensorflow handler needs one of path, paths, dir")
        if ("cache_size" in models) != ("disk_cache_size" in models):
            raise self.fail(mkey, "set both cache_size and disk_cache_size, or neither")
        savedmodel = htype == "tensorflow"
        sources: list[ModelSource] = []

        def source(kind: Literal["path", "dir"], model: str, uri: str) -> ModelSource:
            return ModelSource(name, kind, model, uri, inferentia, savedmodel)

        if "path" in models:
            sources.append(source("path", name, self.uri(models["path"], f"{mkey}.path")))
        elif "paths" in models:
            paths = models["paths"]
            if not isinstance(paths, list) or not paths:
                raise self.fail(f"{mkey}.paths", "expected a non-empty list of {name, path}")
            for j, entry in enumerate(paths):
                pkey = f"{mkey}.paths[{j}]"
                entry = self.mapping(entry, pkey, {"name", "path"})
                mname = self.name(entry.get("name"), f"{pkey}.name")
                if any(s.name == mname for s in sources):
                    raise self.fail(f"{pkey}.name", f"duplicate model name {mname!r}")
                sources.append(source("path", mname, self.uri(entry.get("path"), f"{pkey}.path")))
        elif "dir" in models:
            sources.append(source("dir", "", self.uri(models["dir"], f"{mkey}.dir")))
        signature_key = models.get("signature_key", "")
        if not isinstance(signature_key, str):
            raise self.fail(f"{mkey}.signature_key", "expected a string")
        hconfig = handler.get("config") or {}
        if not isinstance(hconfig, dict):
            raise self.fail(f"{hkey}.config", "expected a mapping")
        hpath = self.file_path(handler.get("path"), f"{hkey}.path", ".py")
        if htype == "python" and not hpath:
            raise self.fail(f"{hkey}.path", "a python handler needs the path of its .py file")
        proto = self.file_path(handler.get("protobuf_path"), f"{hkey}.protobuf_path", ".proto")
        if proto and not hpath:
            raise self.fail(f"{hkey}.protobuf_path", "a service needs a handler (set handler.path)")
        counts = {
            k: self.coerce(handler.get(k, 1), "int", f"{hkey}.{k}", k)
            for k in ("processes_per_replica", "threads_per_process")
        }
        cache = {
            k: self.coerce(models[k], "int", f"{mkey}.{k}", k) if k in models else 0
            for k in ("cache_size", "disk_cache_size")
        }
        if cache["cache_size"]:
            if htype == "tensorflow":
                raise self.fail(
                    f"{mkey}.cache_size",
                    "model caching is for python handlers; the backends keep every version "
                    "of a tensorflow handler's models loaded",
                )
            if cache["cache_size"] > cache["disk_cache_size"]:
                raise self.fail(
                    f"{mkey}.cache_size",
                    f"cache_size ({cache['cache_size']}) must not exceed disk_cache_size "
                    f"({cache['disk_cache_size']})",
                )
            if counts["processes_per_replica"] > 1:
                raise self.fail(
                    f"{mkey}.cache_size",
                    "model caching needs processes_per_replica: 1 (each process would hold "
                    "its own cache, so the limits would not hold for the replica)",
                )
        bkey = f"{hkey}.server_side_batching"
        batching = self.mapping(
            handler.get("server_side_batching"), bkey, {"max_batch_size", "batch_interval"}
        )
        if "server_side_batching" in handler and not batching:
            raise self.fail(bkey, "give max_batch_size (and optionally batch_interval)")
        if batching and htype != "tensorflow":
            raise self.fail(
                bkey,
                "batching joins calls to the backends; a python handler's models never go to them",
            )
        if batching and "max_batch_size" not in batching:
            raise self.fail(f"{bkey}.max_batch_size", "required when batching is configured")
        max_batch = self.coerce(
            batching.get("max_batch_size", 1), "int", f"{bkey}.max_batch_size", ""
        )
        if batching and max_batch < 2:
            raise self.fail(f"{bkey}.max_batch_size", "must be at least 2 (1 never batches)")
        interval = self.coerce(
            batching.get("batch_interval", 0), "Seconds", f"{bkey}.batch_interval", "batch_interval"
        )
        return ApiConfig(
            name=name,
            kind=kind,
            handler_type=htype,
            handler_path=hpath,
            signature_key=signature_key,
            sources=tuple(sources),
            compute=dict(compute),
            handler_config=dict(hconfig),
            protobuf_path=proto,
            max_batch_size=max_batch if batching else 0,
            batch_interval=interval,
            async_config=_async_section(
                self, raw.get("async"), f"{key}.async", kind=kind, handler_path=hpath
            ),
            **counts,
            **cache,
        )

    def file_path(self, value: Any, key: str, suffix: str) -> str:
        """An existing file named relative to the config file; empty when not given."""
        if value is None or value == "":
            return ""
        if not isinstance(value, str):
            raise self.fail(key, "expected a file path")
        path = (self.base / value).resolve()
        if path.suffix != suffix:
            raise self.fail(key, f"{value!r} is not a {suffix} file")
        if not path.is_file():
            raise self.fail(key, f"{path} does not exist")
        return str(path)


TOP_LEVEL = {"gateway", "modelsync", "backends", "version_labels", "apis"}


def load(path: str | os.PathLike[str] | None) -> Config:
    """Reads and validates a config file; ``None`` gives the defaults (plus environment)."""
    if path is None:
        reader = _Reader("<defaults>")
        raw: Any = {}
    else:
        file = str(path)
        reader = _Reader(file)
        try:
            with open(file, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(file, "<file>", exc.strerror or str(exc)) from None
        except yaml.YAMLError as exc:
            raise ConfigError(file, "<file>", f"not valid YAML: {exc}") from None
    top = reader.mapping(raw, "", TOP_LEVEL)
    config = Config(
        file=reader.file,
        gateway=reader.section(GatewayConfig, top.get("gateway"), "gateway"),
        modelsync=reader.section(ModelsyncConfig, top.get("modelsync"), "modelsync"),
        backends=reader.backends(top.get("backends")),
        apis=reader.apis(top.get("apis")),
        version_labels=reader.labels(top.get("version_labels")),
    )
    return config

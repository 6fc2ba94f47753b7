"""Every section and key of the config file, declared once (docs/config.md is written from here).

``GatewayConfig``, ``ModelsyncConfig`` and ``BackendConfig`` are both the file's sections and what
the daemons use. An API spec is read in the file's shape (``ApiSpec``: ``handler.models.path``
...) and handed to the daemons flattened (``ApiConfig``, with its model sources resolved).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from modelmux_common.config.fields import (
    ADDRESS,
    BOOLEAN,
    DURATION,
    FILE,
    FOLDER,
    HTTP_ADDRESS,
    INTEGER,
    LABELS,
    MAPPING,
    MORE_THAN_ZERO,
    NAME,
    POSITIVE,
    SCALAR,
    SIZE,
    STRING,
    URI,
    Context,
    Kind,
    Range,
    choice,
    file,
    section,
    setting,
)

Seconds = float
Accelerator = Literal["cpu", "gpu", "inferentia"]
ACCELERATORS: tuple[Accelerator, ...] = ("cpu", "gpu", "inferentia")
_LEVELS = {name.lower() for name in logging.getLevelNamesMapping()}


def _log_level(value: Any, key: str, ctx: Context) -> str:
    if not isinstance(value, str) or value.lower() not in _LEVELS:
        raise ValueError(f"{value!r} is not a log level ({', '.join(sorted(_LEVELS))})")
    return value


LOG_LEVEL = Kind("log level", _log_level)


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A server's TLS (docs/security.md): its certificate and key, and the CA whose client
    certificates it requires. The files are read again when they change."""

    cert: str = setting(FILE, "the server's certificate chain (PEM), leaf first")
    key: str = setting(FILE, "the certificate's private key (PEM)")
    client_ca: str = setting(
        FILE,
        "CA certificates (PEM) of the clients; set = mutual TLS: a client without a certificate "
        "signed by one of them cannot connect",
        "",
    )


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A client's TLS to a server (a backend, modelsync): whom to trust and, for mutual TLS, its
    own certificate."""

    ca: str = setting(
        FILE,
        "CA certificates (PEM) the server's certificate must chain to",
        "",
        default_doc="the system's roots",
    )
    cert: str = setting(FILE, "this client's certificate chain (PEM), for mutual TLS", "")
    key: str = setting(FILE, "this client's private key (PEM), with `cert`", "")
    server_name: str = setting(
        STRING,
        "the name the server's certificate must carry when it is not the address's host (an IP "
        "address, a resolved `dns:///` backend)",
        "",
    )


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """Where one API's bearer tokens are: a file (one token per line, so a new token can be added
    before the old one is removed) or an environment variable. Never logged."""

    file: str = setting(FILE, "a file of tokens, one per line", "")
    env: str = setting(STRING, "an environment variable holding the token", "")


@dataclass(frozen=True, slots=True)
class AuthSpec:
    """Bearer tokens per API: a call must send `authorization: Bearer <token>` with one of the
    API's tokens. An API without a section stays open."""

    predict: TokenSpec | None = section(
        TokenSpec,
        "`modelmux.v1.Inference/Predict` and TF Serving's PredictionService and ModelService",
    )
    invoke: TokenSpec | None = section(
        TokenSpec, "`modelmux.v1.Inference/Invoke` and the APIs' own services"
    )
    async_: TokenSpec | None = section(TokenSpec, "`modelmux.v1.Async`", key="async")
    jobs: TokenSpec | None = section(TokenSpec, "`modelmux.v1.Jobs`")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: str = setting(STRING, "`host:port`, `[::1]:port` or `unix:/path`", "127.0.0.1:8500")
    max_message_bytes: int = setting(
        SIZE, "largest request or response message accepted", 64 * 1024 * 1024, range=POSITIVE
    )
    # Keeping freed memory makes large messages cost about half the CPU (docs/benchmarks.md).
    reuse_freed_memory: bool = setting(
        BOOLEAN,
        "keep freed memory (up to 4 x max_message_bytes) for reuse instead of returning it to the "
        "kernel at once: about half the CPU per large message, but the resident size stays near "
        "its peak after large calls",
        True,
    )
    backend_timeout: Seconds = setting(
        DURATION,
        "upper bound of every backend call; the caller's own deadline wins when shorter",
        30.0,
        range=MORE_THAN_ZERO,
    )
    manage_backends: bool = setting(
        BOOLEAN,
        "`false` for a gateway that only routes (a sidecar beside a shared pool): it watches the "
        "backends' model status and leaves their configuration to the gateway that manages them",
        True,
    )
    workers: int = setting(
        INTEGER,
        "gateway processes sharing the listening port (SO_REUSEPORT); each keeps its own routing "
        "state and runs its own handler workers",
        1,
        range=POSITIVE,
    )
    modelsync: str = setting(
        STRING,
        "modelsync's address to follow; empty = a static catalogue read from local model folders",
        "",
    )
    dns_refresh: Seconds = setting(
        DURATION,
        "how often `dns:///name:port` backends are re-resolved",
        10.0,
        range=MORE_THAN_ZERO,
    )
    load_timeout: Seconds = setting(
        DURATION,
        "upper bound of a config push that loads new servables (TF Serving answers it once "
        "they loaded)",
        600.0,
        range=MORE_THAN_ZERO,
    )
    status_interval: Seconds = setting(
        DURATION,
        "how often each backend's model status is polled once it has converged",
        2.0,
        range=MORE_THAN_ZERO,
    )
    max_inflight: int = setting(
        INTEGER,
        "calls in flight through the gateway at once; past it a call fails at once with "
        "RESOURCE_EXHAUSTED (nothing is queued)",
        1024,
        range=POSITIVE,
    )
    backend_max_inflight: int = setting(
        INTEGER,
        "calls in flight to one backend at once; a backend at its limit is skipped by routing",
        256,
        range=POSITIVE,
    )
    admin_token: str = setting(
        STRING,
        "token the admin RPCs (SetVersionLabel, SetTrafficSplit) require as `authorization: "
        "Bearer <token>` metadata; empty leaves them open (bind to loopback then)",
        "",
    )
    shutdown_grace: Seconds = setting(
        DURATION, "how long in-flight calls may finish after SIGTERM", 10.0
    )
    handler_timeout: Seconds = setting(
        DURATION,
        "upper bound of a handler call (`Invoke`, the APIs' own services); the caller's deadline "
        "wins when shorter",
        60.0,
        range=MORE_THAN_ZERO,
    )
    handler_start_timeout: Seconds = setting(
        DURATION,
        "how long a handler worker may take to import the handler file and run its `__init__`",
        300.0,
        range=MORE_THAN_ZERO,
    )
    runtime_dir: str = setting(
        FOLDER,
        "where handler workers' sockets, their config snapshot and the disk model caches live "
        "(in a `gateway-<pid>` folder); empty = a fresh temporary folder, removed at exit",
        "",
    )
    log_requests: bool = setting(
        BOOLEAN,
        "one summary log line per request (request id, model, version, backend, status, ms)",
        True,
    )
    log_level: str = setting(LOG_LEVEL, "the gateway's log level", "info")
    tracing: bool = setting(
        BOOLEAN,
        "OpenTelemetry tracing of every call, exported as the standard `OTEL_*` variables say "
        "(docs/tracing.md); also on when `OTEL_TRACES_EXPORTER` names an exporter",
        False,
    )
    state_dir: str = setting(
        FOLDER,
        "durable state: the Async APIs' embedded store is `<state_dir>/async`, the Batch APIs' "
        "`<state_dir>/batch`",
        ".modelmux/state",
    )
    metrics_listen: str = setting(
        HTTP_ADDRESS,
        "host:port of the gateway's Prometheus `/metrics` HTTP endpoint (with `workers` > 1, "
        "one endpoint for all workers); empty = off",
        "",
    )
    tls: ServerTls | None = section(
        ServerTls, "TLS on `listen`; without it the gateway is plaintext"
    )
    modelsync_tls: ClientTls | None = section(
        ClientTls, "TLS to `gateway.modelsync` (set when modelsync serves TLS)"
    )
    auth: AuthSpec = section(AuthSpec, "bearer tokens per API", default=AuthSpec)


@dataclass(frozen=True, slots=True)
class ModelsyncConfig:
    listen: str = setting(STRING, "modelsync's gRPC address", "127.0.0.1:8510")
    target: str = setting(
        FOLDER,
        "the shared volume the backends read: `<target>/<model>/<version>/` views over an "
        "immutable `.store/`",
        "/mnt/models",
    )
    poll_interval: Seconds = setting(
        DURATION,
        "S3 listing interval (local folders are watched, with this as a fallback rescan)",
        10.0,
        range=MORE_THAN_ZERO,
    )
    removal_grace: Seconds = setting(
        DURATION, "how long removed or replaced content stays on disk after its event", 60.0
    )
    download_concurrency: int = setting(INTEGER, "files downloaded at once", 8, range=POSITIVE)
    s3_endpoint_url: str = setting(STRING, "S3 endpoint override (MinIO, moto); empty uses AWS", "")
    s3_region: str = setting(STRING, "S3 region; empty uses the default chain's", "")
    s3_max_attempts: int = setting(
        INTEGER,
        "attempts per S3 API call (botocore's standard retry mode), listings included",
        3,
        range=POSITIVE,
    )
    log_level: str = setting(LOG_LEVEL, "modelsync's log level", "info")
    max_bytes_in_flight: int = setting(
        SIZE,
        "upper bound of the summed sizes of the objects being downloaded at once",
        512 * 1024 * 1024,
        range=POSITIVE,
    )
    stall_timeout: Seconds = setting(
        DURATION,
        "a transfer that receives no byte for this long fails (and is retried); no total limit",
        30.0,
        range=MORE_THAN_ZERO,
    )
    download_attempts: int = setting(
        INTEGER,
        "attempts per file before a download fails (backoff doubles from 0.5 s between them)",
        4,
        range=POSITIVE,
    )
    debounce: Seconds = setting(
        DURATION, "quiet time a local folder must have after a change before it is rescanned", 0.5
    )
    settle: Seconds = setting(
        DURATION,
        "a changed version whose newest file is younger than this (by the source's clock) is "
        "judged on a later tick, so an upload in progress is neither published nor refused",
        2.0,
    )
    progress_interval: Seconds = setting(
        DURATION, "how often a long transfer logs its progress", 5.0, range=MORE_THAN_ZERO
    )
    event_log_size: int = setting(
        INTEGER, "events kept in memory for WatchEvents resumption", 10000, range=POSITIVE
    )
    tls: ServerTls | None = section(ServerTls, "TLS on `listen`; without it modelsync is plaintext")
    metrics_listen: str = setting(
        HTTP_ADDRESS,
        "host:port of modelsync's Prometheus `/metrics` HTTP endpoint; empty = off",
        "",
    )


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str = setting(
        NAME,
        "the backend's name in logs, health and `modelmux backend --name`",
        default_doc="`backend-N`",
    )
    address: str = setting(
        ADDRESS,
        "TF Serving gRPC address: `host:port`, `unix:path`, or `dns:///name:port` for one "
        "backend per resolved address",
    )
    accelerator: Accelerator = setting(
        choice(*ACCELERATORS),
        "APIs with `compute.inf > 0` go to `inferentia` backends only, `compute.gpu > 0` to `gpu` "
        "ones, all others to `cpu` / `gpu` ones",
        "cpu",
    )
    tls: ClientTls | None = section(
        ClientTls,
        "TLS to the backend (TF Serving behind a TLS proxy, or `modelmux backend --tls-*`)",
    )
    metrics_listen: str = setting(
        HTTP_ADDRESS,
        "host:port of the embedded backend's Prometheus `/metrics` HTTP endpoint (`modelmux "
        "backend --name` and `modelmux up`; a TF Serving backend has its own); empty = off",
        "",
    )


@dataclass(frozen=True, slots=True)
class ComputeSpec:
    cpu: Any = setting(SCALAR, "CPU request (recorded, not enforced)", None, default_doc="")
    gpu: Any = setting(
        SCALAR, "more than 0: the API's models load on `gpu` backends only", None, default_doc=""
    )
    inf: Any = setting(
        SCALAR,
        "more than 0: the API's models load on `inferentia` backends only",
        None,
        default_doc="",
    )
    mem: Any = setting(SCALAR, "memory request (recorded, not enforced)", None, default_doc="")


@dataclass(frozen=True, slots=True)
class ModelPathSpec:
    name: str = setting(NAME, "the model's name")
    path: str = setting(URI, "`s3://bucket/prefix/` or a folder (relative to the config file)")


@dataclass(frozen=True, slots=True)
class ModelsSpec:
    path: str | None = setting(URI, "one model named after the API", None, default_doc="")
    paths: tuple[ModelPathSpec, ...] = section(
        ModelPathSpec,
        "several models, each `name` and `path`",
        many=True,
        empty="expected a non-empty list of {name, path}",
    )
    dir: str | None = setting(
        URI, "a folder (or prefix) whose each top-level folder is a model", None, default_doc=""
    )
    signature_key: str = setting(STRING, "the signature Predict uses when a call names none", "")
    cache_size: int | None = setting(
        INTEGER,
        "python: models kept loaded in memory per worker",
        None,
        range=POSITIVE,
        default_doc="no limit",
    )
    disk_cache_size: int | None = setting(
        INTEGER,
        "python: models kept on local disk per worker",
        None,
        range=POSITIVE,
        default_doc="no limit",
    )


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    max_batch_size: int | None = setting(
        INTEGER,
        "most calls joined into one backend call",
        None,
        range=Range(2, False, "must be at least 2 (1 never batches)"),
        default_doc="required",
    )
    batch_interval: Seconds = setting(
        DURATION, "how long a call may wait for a fuller batch; 0 = never wait", 0.0
    )


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    type: str = setting(choice("tensorflow", "python"), "the handler's kind", "tensorflow")
    path: str = setting(
        file(".py"),
        "the handler's `.py` file; required for `python`; without it a tensorflow API only "
        "serves Predict",
        "",
    )
    models: ModelsSpec | None = section(
        ModelsSpec, "tensorflow: where the API's models come from (one of `path`, `paths`, `dir`)"
    )
    multi_model_reloading: ModelsSpec | None = section(
        ModelsSpec, "python: where the models the handler gets come from (through modelsync)"
    )
    config: Mapping[str, Any] = setting(
        MAPPING, "passed to the handler's constructor as `config`", {}
    )
    processes_per_replica: int = setting(INTEGER, "handler worker processes", 1, range=POSITIVE)
    threads_per_process: int = setting(
        INTEGER, "calls each handler worker serves at once", 1, range=POSITIVE
    )
    protobuf_path: str = setting(
        file(".proto"),
        "a `.proto` whose services the API serves; each RPC calls the handler method of its name",
        "",
    )
    server_side_batching: BatchingSpec | None = section(
        BatchingSpec,
        "tensorflow: concurrent Predict calls share backend calls",
        empty="give max_batch_size (and optionally batch_interval)",
    )


@dataclass(frozen=True, slots=True)
class AsyncConfig:
    """An AsyncAPI's `async` section (docs/async.md)."""

    store: str = setting(
        choice("embedded", "aws"),
        "where requests live: `embedded` (SQLite and files in `folder`) or `aws` (SQS + S3)",
        "embedded",
    )
    folder: str = setting(
        FOLDER, "embedded: the store's folder; empty = `<gateway.state_dir>/async`", ""
    )
    bucket: str = setting(
        STRING, "aws: requests live under `s3://<bucket>/<prefix>/<api>/<id>/`", ""
    )
    prefix: str = setting(STRING, "aws: the S3 key prefix", "async")
    queue_prefix: str = setting(
        STRING, "aws: the SQS queue is `<queue_prefix>async-<api>`", "modelmux-"
    )
    region: str = setting(STRING, "aws: the region; empty = the default chain's", "")
    endpoint_url: str = setting(
        STRING, "aws: an S3 and SQS endpoint (MinIO, LocalStack, moto); empty = AWS", ""
    )
    max_attempts: int = setting(
        INTEGER,
        "runs of a request before it is FAILED (a handler error, a worker or gateway that died)",
        3,
        range=POSITIVE,
    )
    visibility_timeout: Seconds = setting(
        DURATION,
        "how long a received request stays hidden from other gateways; renewed while it runs",
        30.0,
        range=MORE_THAN_ZERO,
    )
    result_ttl: Seconds = setting(
        DURATION, "how long a result (or an error) is kept after the request ends", 7 * 24 * 3600.0
    )
    max_queued: int = setting(
        INTEGER,
        "requests queued or running at once; past it Submit gets RESOURCE_EXHAUSTED",
        10000,
        range=POSITIVE,
    )
    max_payload_bytes: int = setting(
        SIZE, "largest payload Submit accepts", 16 * 1024 * 1024, range=POSITIVE
    )
    timeout: Seconds = setting(
        DURATION,
        "upper bound of one handle_async call; past it the attempt fails",
        3600.0,
        range=MORE_THAN_ZERO,
    )


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """A BatchAPI's `batch` section (docs/batch.md)."""

    store: str = setting(
        choice("embedded", "aws"),
        "where jobs live: `embedded` (SQLite and files in `folder`) or `aws` (SQS + S3)",
        "embedded",
    )
    folder: str = setting(
        FOLDER, "embedded: the store's folder; empty = `<gateway.state_dir>/batch`", ""
    )
    bucket: str = setting(STRING, "aws: jobs live under `s3://<bucket>/<prefix>/<api>/`", "")
    prefix: str = setting(STRING, "aws: the S3 key prefix", "batch")
    queue_prefix: str = setting(
        STRING, "aws: a job's SQS queue is `<queue_prefix>batch-<api>-<job id>`", "modelmux-"
    )
    region: str = setting(STRING, "aws: the region; empty = the default chain's", "")
    endpoint_url: str = setting(
        STRING, "aws: an S3 and SQS endpoint (MinIO, LocalStack, moto); empty = AWS", ""
    )
    visibility_timeout: Seconds = setting(
        DURATION,
        "how long a batch a worker took stays hidden from other workers (renewed while it runs),"
        " and how long a job outlives its gateway's last renewal before another adopts it",
        30.0,
        range=MORE_THAN_ZERO,
    )
    spawn_workers: bool = setting(
        BOOLEAN,
        "the gateway starts each job's `workers` processes itself (and replaces those that die); "
        "false: `modelmux worker --api NAME` processes started elsewhere run the jobs",
        True,
    )


@dataclass(frozen=True, slots=True)
class ApiSpec:
    name: str = setting(NAME, "the API's name, used by `Invoke`")
    kind: str = setting(
        choice("RealtimeAPI", "AsyncAPI", "BatchAPI"),
        "an `AsyncAPI` with a handler runs its `handle_async`, a `BatchAPI` with a handler runs "
        "jobs of `handle_batch` (and serves no realtime traffic); without a handler an `AsyncAPI` or "
        "`BatchAPI` serves its models to Predict like a "
        "`RealtimeAPI`",
        "RealtimeAPI",
    )
    handler: HandlerSpec = section(HandlerSpec, "how the API serves", default=HandlerSpec)
    compute: ComputeSpec = section(
        ComputeSpec, "the resources the API runs on", default=ComputeSpec
    )
    async_: AsyncConfig | None = section(
        AsyncConfig, "AsyncAPI: the request store, queue, attempts and limits", key="async"
    )
    batch: BatchConfig | None = section(BatchConfig, "BatchAPI: the job store, queues and workers")


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
    # kind: AsyncAPI with a handler: its `async` section
    async_config: AsyncConfig | None = None
    # kind: BatchAPI with a handler: its `batch` section
    batch_config: BatchConfig | None = None

    @property
    def inferentia(self) -> bool:
        return positive(self.compute.get("inf", 0))

    @classmethod
    def of(cls, spec: ApiSpec) -> ApiConfig:
        """The daemons' view of an API spec the loader has checked."""
        handler = spec.handler
        models = handler.models or handler.multi_model_reloading or ModelsSpec()
        compute = {
            k: v
            for k in ("cpu", "gpu", "inf", "mem")
            if (v := getattr(spec.compute, k)) is not None
        }

        def source(kind: Literal["path", "dir"], model: str, uri: str) -> ModelSource:
            return ModelSource(
                spec.name,
                kind,
                model,
                uri,
                positive(compute.get("inf", 0)),
                handler.type == "tensorflow",
            )

        sources = [source("path", p.name, p.path) for p in models.paths]
        if models.path is not None:
            sources.append(source("path", spec.name, models.path))
        if models.dir is not None:
            sources.append(source("dir", "", models.dir))
        batching = handler.server_side_batching
        return cls(
            name=spec.name,
            kind=spec.kind,
            handler_type=handler.type,
            handler_path=handler.path,
            signature_key=models.signature_key,
            sources=tuple(sources),
            compute=compute,
            handler_config=dict(handler.config),
            processes_per_replica=handler.processes_per_replica,
            threads_per_process=handler.threads_per_process,
            protobuf_path=handler.protobuf_path,
            cache_size=models.cache_size or 0,
            disk_cache_size=models.disk_cache_size or 0,
            max_batch_size=batching.max_batch_size or 0 if batching else 0,
            batch_interval=batching.batch_interval if batching else 0.0,
            async_config=(
                (spec.async_ or AsyncConfig()) if spec.kind == "AsyncAPI" and handler.path else None
            ),
            batch_config=(
                (spec.batch or BatchConfig()) if spec.kind == "BatchAPI" and handler.path else None
            ),
        )


@dataclass(frozen=True, slots=True)
class Document:
    """The file's top level."""

    gateway: GatewayConfig = section(
        GatewayConfig, "the gateway (`modelmux gateway`)", default=GatewayConfig, env=True
    )
    modelsync: ModelsyncConfig = section(
        ModelsyncConfig, "modelsync (`modelmux sync`)", default=ModelsyncConfig, env=True
    )
    backends: tuple[BackendConfig, ...] = section(
        BackendConfig,
        "the TF Serving backends the gateway routes to",
        many=True,
        item_defaults=lambda i: {"name": f"backend-{i}"},
    )
    version_labels: Mapping[str, Mapping[str, int]] = setting(
        LABELS, "model -> label -> version, e.g. `half_plus_two: {stable: 1}`", {}
    )
    apis: tuple[ApiSpec, ...] = section(ApiSpec, "Cortex-style API specs", many=True)


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


def positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False

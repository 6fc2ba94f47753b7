"""Rules between keys, checked while the file loads; each docstring's first line is docs/config.md's.

A rule of a section (``@rule(HandlerSpec)``) runs as soon as that section is read, with the key it
was read at; the gateway's rules (``@gateway_rule``) are about the whole file as the gateway uses
it, and run only when the gateway loads it (``load(path, daemon="gateway")``): modelsync, for one,
mirrors S3 sources whether or not the gateway follows it.
"""

from __future__ import annotations

from collections.abc import Callable

from modelmux_common.config.fields import Context, rule
from modelmux_common.config.schema import (
    ApiSpec,
    BatchingSpec,
    ClientTls,
    ComputeSpec,
    Config,
    Document,
    HandlerSpec,
    ModelsSpec,
    ServerTls,
    TokenSpec,
    positive,
)
from modelmux_common.security import TlsError, check_ca, check_certificate, read_tokens

GatewayRule = Callable[[Config, Context], None]
GATEWAY_RULES: list[GatewayRule] = []


def gateway_rule(fn: GatewayRule) -> GatewayRule:
    GATEWAY_RULES.append(fn)
    return fn


@rule(ApiSpec)
def _async_section(api: ApiSpec, key: str, ctx: Context) -> None:
    """Only an `AsyncAPI` has an `async` section, and only with a handler (`handle_async`);
    `async.store: aws` needs `async.bucket`."""
    if api.kind != "AsyncAPI":
        if api.async_ is not None:
            raise ctx.fail(
                f"{key}.async", f"only a kind: AsyncAPI has an async section (this is a {api.kind})"
            )
        return
    section = api.async_
    if section is not None and not api.handler.path:
        raise ctx.fail(f"{key}.handler.path", "an AsyncAPI's async section runs handle_async")
    if section is not None and section.store == "aws" and not section.bucket:
        raise ctx.fail(f"{key}.async.bucket", "store: aws needs the S3 bucket")


@rule(ApiSpec)
def _batch_section(api: ApiSpec, key: str, ctx: Context) -> None:
    """Only a `BatchAPI` has a `batch` section, and only with a handler (`handle_batch`);
    `batch.store: aws` needs `batch.bucket`."""
    section = api.batch
    if api.kind != "BatchAPI":
        if section is not None:
            raise ctx.fail(
                f"{key}.batch", f"only a kind: BatchAPI has a batch section (this is a {api.kind})"
            )
        return
    if section is not None and not api.handler.path:
        raise ctx.fail(f"{key}.handler.path", "a BatchAPI's batch section runs handle_batch")
    if section is not None and section.store == "aws" and not section.bucket:
        raise ctx.fail(f"{key}.batch.bucket", "store: aws needs the S3 bucket")
    if api.handler.protobuf_path:
        raise ctx.fail(f"{key}.handler.protobuf_path", "a BatchAPI serves no realtime traffic")


@rule(ComputeSpec)
def _gpu_or_inf(compute: ComputeSpec, key: str, ctx: Context) -> None:
    """`compute.gpu` and `compute.inf` are not both more than 0."""
    if positive(compute.inf) and positive(compute.gpu):
        raise ctx.fail(key, "an API runs on either gpu or inf, not both")


@rule(ModelsSpec)
def _one_source(models: ModelsSpec, key: str, ctx: Context) -> None:
    """A models section gives at most one of `path`, `paths`, `dir`; `paths` names are unique;
    `cache_size` and `disk_cache_size` come together."""
    given = [k for k in ("path", "paths", "dir") if getattr(models, k) not in (None, ())]
    if len(given) > 1:
        raise ctx.fail(key, f"give exactly one of path, paths, dir (got {', '.join(given)})")
    seen: set[str] = set()
    for j, entry in enumerate(models.paths):
        if entry.name in seen:
            raise ctx.fail(f"{key}.paths[{j}].name", f"duplicate model name {entry.name!r}")
        seen.add(entry.name)
    if (models.cache_size is None) != (models.disk_cache_size is None):
        raise ctx.fail(key, "set both cache_size and disk_cache_size, or neither")


@rule(HandlerSpec)
def _models_key(handler: HandlerSpec, key: str, ctx: Context) -> None:
    """A tensorflow handler takes `models` (with a source), a python one `multi_model_reloading`."""
    own, other = (
        ("models", "multi_model_reloading")
        if handler.type == "tensorflow"
        else ("multi_model_reloading", "models")
    )
    if getattr(handler, other) is not None:
        raise ctx.fail(f"{key}.{other}", f"not valid for a {handler.type} handler (use {own})")
    models = getattr(handler, own) or ModelsSpec()
    if handler.type == "tensorflow" and models.path is None and not models.paths and not models.dir:
        raise ctx.fail(f"{key}.{own}", "a tensorflow handler needs one of path, paths, dir")


@rule(HandlerSpec)
def _cache(handler: HandlerSpec, key: str, ctx: Context) -> None:
    """Model caching (`cache_size`) is for python handlers, at most `disk_cache_size`, with
    `processes_per_replica: 1`."""
    models = handler.models or handler.multi_model_reloading
    if models is None or not models.cache_size or models.disk_cache_size is None:
        return
    ckey = f"{key}.{'models' if handler.models else 'multi_model_reloading'}.cache_size"
    if handler.type == "tensorflow":
        raise ctx.fail(
            ckey,
            "model caching is for python handlers; the backends keep every version "
            "of a tensorflow handler's models loaded",
        )
    if models.cache_size > models.disk_cache_size:
        raise ctx.fail(
            ckey,
            f"cache_size ({models.cache_size}) must not exceed disk_cache_size "
            f"({models.disk_cache_size})",
        )
    if handler.processes_per_replica > 1:
        raise ctx.fail(
            ckey,
            "model caching needs processes_per_replica: 1 (each process would hold "
            "its own cache, so the limits would not hold for the replica)",
        )


@rule(HandlerSpec)
def _handler_file(handler: HandlerSpec, key: str, ctx: Context) -> None:
    """A python handler, and an API with a `protobuf_path`, need `handler.path`."""
    if handler.type == "python" and not handler.path:
        raise ctx.fail(f"{key}.path", "a python handler needs the path of its .py file")
    if handler.protobuf_path and not handler.path:
        raise ctx.fail(f"{key}.protobuf_path", "a service needs a handler (set handler.path)")


@rule(HandlerSpec)
def _batching(handler: HandlerSpec, key: str, ctx: Context) -> None:
    """`server_side_batching` is for tensorflow handlers and needs `max_batch_size`."""
    batching: BatchingSpec | None = handler.server_side_batching
    if batching is None:
        return
    bkey = f"{key}.server_side_batching"
    if handler.type != "tensorflow":
        raise ctx.fail(
            bkey, "batching joins calls to the backends; a python handler's models never go to them"
        )
    if batching.max_batch_size is None:
        raise ctx.fail(f"{bkey}.max_batch_size", "required when batching is configured")


@rule(ServerTls)
def _server_tls(tls: ServerTls, key: str, ctx: Context) -> None:
    """A TLS section's `key` is the private key of its `cert`; `client_ca` holds CA certificates."""
    try:
        check_certificate(tls.cert, tls.key)
    except TlsError as exc:
        raise ctx.fail(f"{key}.key", str(exc)) from None
    if tls.client_ca:
        try:
            check_ca(tls.client_ca)
        except TlsError as exc:
            raise ctx.fail(f"{key}.client_ca", str(exc)) from None


@rule(ClientTls)
def _client_tls(tls: ClientTls, key: str, ctx: Context) -> None:
    """A client's `cert` and `key` come together and match; `ca` holds CA certificates."""
    if bool(tls.cert) != bool(tls.key):
        raise ctx.fail(f"{key}.{'key' if tls.cert else 'cert'}", "cert and key go together")
    try:
        if tls.cert:
            check_certificate(tls.cert, tls.key)
    except TlsError as exc:
        raise ctx.fail(f"{key}.key", str(exc)) from None
    try:
        if tls.ca:
            check_ca(tls.ca)
    except TlsError as exc:
        raise ctx.fail(f"{key}.ca", str(exc)) from None


@rule(TokenSpec)
def _tokens(spec: TokenSpec, key: str, ctx: Context) -> None:
    """A token section gives exactly one of `file` and `env`, and it holds a bearer token."""
    if bool(spec.file) == bool(spec.env):
        raise ctx.fail(key, "give exactly one of file and env")
    try:
        read_tokens(spec)
    except ValueError as exc:
        raise ctx.fail(f"{key}.{'file' if spec.file else 'env'}", str(exc)) from None


@rule(Document)
def _unique_names(doc: Document, key: str, ctx: Context) -> None:
    """Backend names, API names and model names (of `path` / `paths`) are unique."""
    backends: set[str] = set()
    for b in doc.backends:
        if b.name in backends:
            raise ctx.fail("backends", f"duplicate backend name {b.name!r}")
        backends.add(b.name)
    apis: set[str] = set()
    models: dict[str, str] = {}
    for api in doc.apis:
        if api.name in apis:
            raise ctx.fail("apis", f"duplicate API name {api.name!r}")
        apis.add(api.name)
        for model in _model_names(api):
            if model in models:
                raise ctx.fail(
                    "apis", f"model {model!r} is defined by both {models[model]!r} and {api.name!r}"
                )
            models[model] = api.name


def _model_names(api: ApiSpec) -> list[str]:
    models = api.handler.models or api.handler.multi_model_reloading or ModelsSpec()
    return [api.name] if models.path is not None else [p.name for p in models.paths]


@gateway_rule
def _modelsync_for_python(config: Config, ctx: Context) -> None:
    """Python handlers' models come through modelsync: they need `gateway.modelsync`."""
    for i, api in enumerate(config.apis):
        if api.handler_type == "python" and api.sources and not config.gateway.modelsync:
            raise ctx.fail(
                f"apis[{i}].handler.multi_model_reloading",
                "python handlers' models come through modelsync: set gateway.modelsync",
            )


@gateway_rule
def _modelsync_for_s3(config: Config, ctx: Context) -> None:
    """Without `gateway.modelsync` the gateway reads local folders: no `s3://` sources."""
    if config.gateway.modelsync:
        return
    for i, api in enumerate(config.apis):
        for source in api.sources:
            if source.savedmodel and source.is_s3:
                raise ctx.fail(
                    f"apis[{i}].handler.models",
                    f"{source.uri} is on S3: set gateway.modelsync to serve S3 sources",
                )


@gateway_rule
def _one_worker_for_caches(config: Config, ctx: Context) -> None:
    """Model caching (`cache_size`) needs `gateway.workers: 1`."""
    for i, api in enumerate(config.apis):
        if api.handler_path and api.cache_size and config.gateway.workers > 1:
            raise ctx.fail(
                f"apis[{i}].handler.multi_model_reloading.cache_size",
                "model caching needs gateway.workers: 1 (each gateway worker runs its own "
                "handler workers, so the limits would not hold for the replica)",
            )


@gateway_rule
def _workers_on_tcp(config: Config, ctx: Context) -> None:
    """More than one `gateway.workers` need a TCP `gateway.listen`."""
    if config.gateway.workers > 1 and config.gateway.listen.startswith("unix:"):
        raise ctx.fail("gateway.listen", "several workers need a TCP address, not a unix socket")

"""What a handler's constructor receives: ``tensorflow_client``, ``model_client``, ``metrics_client``.

These run inside a handler worker process, on the handler's own threads.

``TensorFlowClient.predict(model_input, model_name=None, model_version=None)`` calls the gateway
(through its private socket, so routing, version labels and live reloading all apply) and returns
a :class:`Prediction`: a dict from output name to :class:`Values`, the output's values flattened in
row-major order as a list (as Cortex returned them), with the shaped numpy array as ``.array``.

``ModelClient.get_model(model_name=None, model_version=None)`` returns what the handler's
``load_model(path)`` returned for that version, loading it on first use; with ``cache_size`` and
``disk_cache_size`` at most that many versions are held in memory and copied to local disk at any
moment (least recently used goes first, before the next one loads).
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import structlog

from gateway.auth import HANDLER_CALL_KEY, HANDLER_SECRET_ENV
from gateway.errors import (
    FailedPrecondition,
    GatewayError,
    InvalidArgument,
    NotFound,
    Status,
    Unavailable,
)
from gateway.signatures import Signature, specs
from gateway.tensors import json_to_proto, proto_to_numpy
from modelmux_common import tracing
from modelmux_common.metrics import HandlerMetrics
from modelmux_common.tfserving import (
    get_model_metadata_pb2,
    predict_pb2,
)

log = structlog.get_logger("modelmux.handler")

# The handler call in progress on this thread: its deadline and request id reach the gateway.
current = threading.local()
# Threads running a load_model() now: a long load is not a stuck call (the watchdog skips them).
loading: set[int] = set()


def call_deadline() -> float | None:
    """Seconds left of the handler call running on this thread (None outside one)."""
    deadline = getattr(current, "deadline", None)
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# Marks the gateway calls of a handler with the secret the gateway gave its workers (taken out of
# the environment before the handler's code runs): a draining gateway still lets them through,
# since the Invoke they serve was accepted before it began draining, and gateway.auth asks them
# for no token (gateway/auth.py).
HANDLER_CALL = (HANDLER_CALL_KEY, os.environ.pop(HANDLER_SECRET_ENV, ""))


def _metadata() -> tuple[tuple[str, str], ...]:
    """A handler's call to the gateway: marked, with the request id and (tracing on) the
    current span's trace context."""
    request_id = getattr(current, "request_id", "")
    marks = (HANDLER_CALL, ("x-request-id", request_id)) if request_id else (HANDLER_CALL,)
    traced = tracing.active()
    return marks if traced is None else marks + traced.headers()


class Values(list[Any]):
    """An output's values flattened in row-major order; ``array`` keeps the shape and dtype."""

    array: np.ndarray[Any, Any]

    @classmethod
    def of(cls, array: np.ndarray[Any, Any]) -> Values:
        flat = array.reshape(-1).tolist()
        if array.dtype == object:
            flat = [_text(v) for v in flat]
        values = cls(flat)
        values.array = array
        return values

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    return value


class Prediction(dict[str, Values]):
    """Output name -> :class:`Values`; ``model_version`` is the version that ran."""

    model_version: int = 0
    signature_key: str = ""

    @property
    def arrays(self) -> dict[str, np.ndarray[Any, Any]]:
        return {name: values.array for name, values in self.items()}


@dataclass(frozen=True, slots=True)
class _Meta:
    version: int
    signature_key: str
    signature: Signature


def choose_signature(configured: str, names: list[str], model: str) -> str:
    """The configured key; else the only signature; else ``predict``; else an error listing them."""
    keys = sorted(n for n in names if not n.startswith("__"))
    listing = ", ".join(keys) or "none"
    if configured:
        if configured not in keys:
            raise InvalidArgument(
                f"model {model!r} has no signature {configured!r} (signature_key); it has {listing}"
            )
        return configured
    if len(keys) == 1:
        return keys[0]
    if "predict" in keys:
        return "predict"
    raise InvalidArgument(
        f"model {model!r} has several signatures ({listing}): set handler.models.signature_key"
    )


def _version(model_version: Any) -> int | None:
    if model_version is None or str(model_version) == "latest":
        return None
    try:
        version = int(str(model_version))
    except ValueError:
        raise InvalidArgument(
            f"model_version {model_version!r} is not a version number or 'latest'"
        ) from None
    if version < 0:
        raise InvalidArgument(f"model_version {version} is negative")
    return version


def default_model(model_name: Any, names: list[str], api: str) -> str:
    if model_name is not None:
        return str(model_name)
    if len(names) == 1:
        return names[0]
    raise InvalidArgument(
        f"API {api!r} serves several models: pass model_name (one of {', '.join(names) or 'none'})"
    )


def _status(exc: grpc.RpcError) -> Status:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return Status(code, details or code.name)


class TensorFlowClient:
    """Runs the API's TensorFlow models through the gateway (Cortex's TensorFlowClient)."""

    def __init__(
        self,
        target: str,
        *,
        api: str,
        models: list[str],
        signature_key: str,
        timeout: float,
        only_listed: bool = False,
    ) -> None:
        self.api = api
        self.models = models
        # path/paths sources name every model of the API: others are refused, as Cortex did
        # (a dir source's models are whatever the folder holds, so any served name is tried)
        self.only_listed = only_listed
        self.signature_key = signature_key
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
            ],
        )
        service = "/tensorflow.serving.PredictionService/"
        self._predict = self._channel.unary_unary(
            service + "Predict",
            request_serializer=predict_pb2.PredictRequest.SerializeToString,
            response_deserializer=predict_pb2.PredictResponse.FromString,
        )
        self._metadata = self._channel.unary_unary(
            service + "GetModelMetadata",
            request_serializer=get_model_metadata_pb2.GetModelMetadataRequest.SerializeToString,
            response_deserializer=get_model_metadata_pb2.GetModelMetadataResponse.FromString,
        )
        # (model, version or None for latest) -> signature of the version last seen
        self._meta: dict[tuple[str, int | None], _Meta] = {}
        self._lock = threading.Lock()

    def _timeout(self) -> float:
        left = call_deadline()
        return self.timeout if left is None else min(left, self.timeout)

    def _fetch(self, model: str, version: int | None) -> _Meta:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        try:
            response = self._metadata(request, timeout=self._timeout(), metadata=_metadata())
        except grpc.RpcError as exc:
            raise _status(exc) from None
        defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(defs)
        key = choose_signature(self.signature_key, list(defs.signature_def), model)
        sig = defs.signature_def[key]
        meta = _Meta(
            response.model_spec.version.value,
            key,
            Signature(specs(sig.inputs), specs(sig.outputs)),
        )
        with self._lock:
            self._meta[(model, version)] = meta
        return meta

    def predict(
        self, model_input: Any, model_name: Any = None, model_version: Any = None
    ) -> Prediction:
        traced = tracing.active()
        if traced is None:
            return self._predicted(model_input, model_name, model_version)
        # a span of its own: the gateway calls it makes (metadata, Predict) are its children
        span = traced.internal(
            "tensorflow_client.predict",
            {"modelmux.model": str(model_name or ""), "modelmux.version": str(model_version or "")},
        )
        token = traced.current(span)
        code = grpc.StatusCode.OK
        try:
            return self._predicted(model_input, model_name, model_version)
        except GatewayError as exc:
            code = exc.code
            raise
        except BaseException:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            traced.restore(token)
            traced.end(span, code, server=False)

    def _predicted(self, model_input: Any, model_name: Any, model_version: Any) -> Prediction:
        model = default_model(model_name, self.models, self.api)
        if self.only_listed and model not in self.models:
            raise NotFound(
                f"API {self.api!r} has no model {model!r} (it has {', '.join(self.models)})"
            )
        version = _version(model_version)
        meta = self._meta.get((model, version)) or self._fetch(model, version)
        try:
            return self._run(model_input, model, version, meta)
        except (Status, InvalidArgument) as exc:
            # the version may have been replaced (a new latest, content rewritten in place) with
            # another signature since it was read: read it again, and retry if it changed
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            fresh = self._fetch(model, version)
            if fresh == meta:
                raise
            return self._run(model_input, model, version, fresh)

    def _run(self, model_input: Any, model: str, version: int | None, meta: _Meta) -> Prediction:
        if not isinstance(model_input, Mapping):
            raise InvalidArgument(
                f"model_input must be a dict of signature inputs ({', '.join(meta.signature.inputs)}),"
                f" got {type(model_input).__name__}"
            )
        missing = [n for n in meta.signature.inputs if n not in model_input]
        extra = [str(n) for n in model_input if n not in meta.signature.inputs]
        if missing or extra:
            parts = [
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(extra)}" if extra else "",
            ]
            raise InvalidArgument(
                f"inputs of signature {meta.signature_key!r} of model {model!r} are "
                f"{', '.join(meta.signature.inputs)}: {'; '.join(p for p in parts if p)}"
            )
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = meta.signature_key
        if version is not None:
            request.model_spec.version.value = version
        for name, spec in meta.signature.inputs.items():
            json_to_proto(
                name,
                model_input[name],
                request.inputs[name],
                tf_dtype=spec.dtype,
                signature_shape=spec.shape,
            )
        try:
            response = self._predict(request, timeout=self._timeout(), metadata=_metadata())
        except grpc.RpcError as exc:
            raise _status(exc) from None
        ran = response.model_spec.version.value
        if version is None and ran and ran != meta.version:
            with self._lock:  # a newer latest: read its signature before the next call
                self._meta.pop((model, None), None)
        out = Prediction(
            {name: Values.of(proto_to_numpy(t)) for name, t in response.outputs.items()}
        )
        out.model_version = ran
        out.signature_key = meta.signature_key
        return out

    def close(self) -> None:
        self._channel.close()


class ModelClient:
    """Loads an API's models with the handler's ``load_model`` (Cortex's ModelClient)."""

    def __init__(
        self,
        load_model: Callable[[str], Any],
        *,
        api: str,
        names: list[str],
        cache_size: int = 0,
        disk_cache_size: int = 0,
        disk_dir: str = "",
    ) -> None:
        self.load_model = load_model
        self.api = api
        self.names = names  # models named in the config (a dir source adds the ones it finds)
        self.cache_size = cache_size
        self.disk_cache_size = disk_cache_size
        self.disk_dir = disk_dir
        # model -> version -> immutable store folder of its current content
        self._paths: dict[str, dict[int, str]] = {}
        # model -> why modelsync refuses it (see refuse())
        self._refused: dict[str, str] = {}
        self._synced = threading.Event()
        # (model, version, store folder) -> what load_model returned; least recently used first
        self._memory: OrderedDict[tuple[str, int, str], Any] = OrderedDict()
        # store folder -> local copy; least recently used first
        self._disk: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        # loads run one at a time, so the limits hold while a model loads
        self._loading = threading.Lock()
        if disk_cache_size:  # copies a previous worker left are not counted: start empty
            shutil.rmtree(disk_dir, ignore_errors=True)
            os.makedirs(disk_dir)

    def update(self, paths: Mapping[str, Mapping[int, str]]) -> None:
        """The API's current versions (from modelsync); content no longer current is dropped."""
        with self._lock:
            self._paths = {m: dict(v) for m, v in paths.items()}
            live = {(m, v, p) for m, vs in self._paths.items() for v, p in vs.items()}
            stale = [k for k in self._memory if k not in live]
            for key in stale:
                del self._memory[key]
            gone = [p for p in self._disk if not any(p == k[2] for k in live)]
            removed = [self._disk.pop(p) for p in gone]
        self._synced.set()
        for local in removed:
            shutil.rmtree(local, ignore_errors=True)
        if stale:
            gc.collect()
            log.info("models_dropped", models=[f"{m}:{v}" for m, v, _ in stale])
        if not self.cache_size:
            self._preload(live)

    def refuse(self, refused: Mapping[str, str]) -> None:
        """What modelsync refuses of the API's models (model -> reason), for the errors of
        get_model() when a model has nothing published."""
        with self._lock:
            self._refused = dict(refused)

    def _preload(self, keys: set[tuple[str, int, str]]) -> None:
        """Without a cache limit every version is loaded ahead of its first call, as it arrives."""

        def run() -> None:
            for key in sorted(keys):
                with self._lock:
                    if self._paths.get(key[0], {}).get(key[1]) != key[2]:
                        continue  # replaced or removed meanwhile
                try:
                    self._get(key)
                except Exception:
                    log.exception("model_load_failed", model=key[0], version=key[1])

        threading.Thread(target=run, name="model-preload", daemon=True).start()

    def get_model(self, model_name: Any = None, model_version: Any = None) -> Any:
        left = call_deadline()
        self._synced.wait(30.0 if left is None else left)
        with self._lock:
            names = sorted(set(self.names) | set(self._paths))
            model = default_model(model_name, names, self.api)
            versions = self._paths.get(model)
            if not versions:
                if model in self._refused:
                    raise FailedPrecondition(
                        f"model {model!r} of API {self.api!r} cannot be served: "
                        f"{self._refused[model]}"
                    )
                if model in self.names:
                    raise Unavailable(
                        f"model {model!r} of API {self.api!r} has no version published yet"
                    )
                raise NotFound(
                    f"API {self.api!r} has no model {model!r} (it has {', '.join(names) or 'none'})"
                )
            version = _version(model_version)
            if version is None:
                version = max(versions)
            elif version not in versions:
                raise NotFound(
                    f"model {model!r} has no version {version} "
                    f"(it has {', '.join(map(str, sorted(versions)))})"
                )
            key = (model, version, versions[version])
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        return self._get(key)

    def _get(self, key: tuple[str, int, str]) -> Any:
        left = call_deadline()
        if not self._loading.acquire(timeout=-1 if left is None else left):
            raise Status(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"model {key[0]!r} version {key[1]} was still waiting for another model's "
                "load_model() at the deadline",
            )
        loading.add(threading.get_ident())
        try:
            return self._load(key)
        finally:
            loading.discard(threading.get_ident())
            self._loading.release()

    def _load(self, key: tuple[str, int, str]) -> Any:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
            evicted = []
            while self.cache_size and len(self._memory) >= self.cache_size:
                evicted.append(self._memory.popitem(last=False)[0])
        if evicted:
            gc.collect()
            log.info("models_evicted", models=[f"{m}:{v}" for m, v, _ in evicted])
        path = self._local(key[2]) if self.disk_cache_size else key[2]
        started = time.perf_counter()
        model = self.load_model(path)
        log.info(
            "model_loaded",
            model=key[0],
            version=key[1],
            path=path,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        with self._lock:
            current_paths = self._paths.get(key[0], {})
            if current_paths.get(key[1]) == key[2]:  # still current after the load
                self._memory[key] = model
        return model

    def _local(self, store: str) -> str:
        """A local copy of a store folder, making room first (called with the loading lock)."""
        with self._lock:
            if store in self._disk:
                self._disk.move_to_end(store)
                return self._disk[store]
            removed = []
            in_memory = {k[2] for k in self._memory}
            while len(self._disk) >= self.disk_cache_size:
                # the least recently used copy whose model is not loaded (one always exists:
                # memory holds fewer than cache_size <= disk_cache_size models here)
                victim = next((p for p in self._disk if p not in in_memory), None)
                if victim is None:
                    break
                removed.append(self._disk.pop(victim))
        for local in removed:
            shutil.rmtree(local, ignore_errors=True)
        parts = os.path.normpath(store).split(os.sep)
        local = os.path.join(self.disk_dir, "-".join(parts[-3:]))
        shutil.rmtree(local, ignore_errors=True)
        shutil.rmtree(local + ".partial", ignore_errors=True)
        shutil.copytree(store, local + ".partial", symlinks=True)
        os.rename(local + ".partial", local)
        with self._lock:
            self._disk[store] = local
        return local


class MetricsClient:
    """Cortex's metrics_client: each call writes a structured ``metric`` log line and, when the
    gateway exports metrics, updates a Prometheus metric (modelmux_common/metrics.py)."""

    def __init__(self) -> None:
        self._prometheus = HandlerMetrics()

    def _put(self, kind: str, metric: str, value: float, tags: Mapping[str, str] | None) -> None:
        log.info("metric", kind=kind, metric=metric, value=value, tags=dict(tags or {}))
        self._prometheus.put(kind, metric, value, tags)

    def increment(
        self, metric: str, value: float = 1, tags: Mapping[str, str] | None = None
    ) -> None:
        self._put("counter", metric, value, tags)

    def gauge(self, metric: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._put("gauge", metric, value, tags)

    def histogram(self, metric: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._put("histogram", metric, value, tags)


def plain(value: Any, *, protobuf_json: bool = False) -> Any:
    """A handler's return value as JSON-able Python (numpy and tuples included). With
    ``protobuf_json``, NaN and ±Infinity become the strings protobuf's JSON mapping uses for them
    ("NaN", "Infinity", "-Infinity"), which json_format.ParseDict reads back into float fields
    (it refuses the float values themselves)."""
    if isinstance(value, float) and protobuf_json and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), protobuf_json=protobuf_json)
    if isinstance(value, np.generic):
        return plain(value.item(), protobuf_json=protobuf_json)
    if isinstance(value, Mapping):
        return {str(k): plain(v, protobuf_json=protobuf_json) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, protobuf_json=protobuf_json) for v in value]
    if isinstance(value, bytes):
        text = _text(value)
        return text if isinstance(text, str) else value.hex()
    raise TypeError(f"a {type(value).__name__} is not JSON")

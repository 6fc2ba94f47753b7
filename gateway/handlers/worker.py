"""A handler worker: one process running an API's handler behind a gRPC server on a unix socket.

The gateway starts ``processes_per_replica`` of these per API (gateway/handlers/pool.py), each
serving ``threads_per_process`` calls at once. The first line on stdout is ``{"ready": true}`` or
``{"failed": "<reason>"}``; after it, stdout is the log stream (stderr), so a handler's prints
land in the log. A worker exits on SIGTERM / SIGINT, and when the gateway is gone, however it died
(modelmux_common/supervision.py).

Errors: a :class:`GatewayError` (bad input to ``tensorflow_client``, an unknown model, a status the
gateway returned) keeps its status; anything else the handler raises is INTERNAL with the request
id, and its trace goes to the log only. Every status a worker sets carries the trailer
``x-modelmux-handler: 1``, which tells the gateway a status from a worker that lost its connection.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import os
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import grpc
import structlog
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError

from gateway.asyncapi import payloads
from gateway.catalog import Problems, refusal_text
from gateway.errors import GatewayError, Unimplemented
from gateway.follower import Follower
from gateway.handlers import userproto
from gateway.handlers.clients import (
    MetricsClient,
    ModelClient,
    TensorFlowClient,
    current,
    loading,
    plain,
)
from gateway.tensors import from_value
from modelmux.v1 import inference_pb2
from modelmux_common import logs, supervision, tracing
from modelmux_common.config import ApiConfig, ClientTls, Config
from modelmux_common.grpcutil import bind, message_size_options
from modelmux_common.listen import ListenError, server_options

log = structlog.get_logger("modelmux.handler")

MARK = (("x-modelmux-handler", "1"),)
DEBUG_KEY = "x-modelmux-debug"
INVOKE_ARGS = ("payload", "query_params", "headers")
ASYNC_ARGS = ("payload", "request_id")
# The async call a gateway's runner makes (gateway/asyncapi/runner.py): the payload's bytes in,
# an InvokeResponse out; request id and content type in the metadata.
HANDLE_ASYNC = ("modelmux.handler.Worker", "HandleAsync")
CONTENT_TYPE_KEY = "x-modelmux-content-type"
INVOKE_RPC = "modelmux.v1.Inference/Invoke"
# A worker whose every thread is stuck this long past its call's deadline exits (to be replaced).
STUCK_GRACE = 5.0


class StartError(Exception):
    """The handler cannot start; the message says why, for the gateway's start-up error."""


class ResultError(Exception):
    """What the handler returned cannot be sent as the RPC's response (the message says why)."""


def _params(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())


def _handler_class(api: ApiConfig) -> type:
    name = f"modelmux_handler_{api.name.replace('-', '_').replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(name, api.handler_path)
    if spec is None or spec.loader is None:
        raise StartError(f"cannot import {api.handler_path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, os.path.dirname(api.handler_path))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise StartError(
            f"importing {api.handler_path} raised {type(exc).__name__}: {exc}"
        ) from exc
    legacy = "TensorFlowPredictor" if api.handler_type == "tensorflow" else "PythonPredictor"
    for cls_name in ("Handler", legacy):
        cls = getattr(module, cls_name, None)
        if inspect.isclass(cls):
            return cls
    raise StartError(f"{api.handler_path} defines no class Handler (or {legacy})")


class Runtime:
    """One API's handler instance and the gRPC methods that call it."""

    def __init__(
        self,
        config: Config,
        api: ApiConfig,
        *,
        gateway: str,
        cache_dir: str,
        descriptors: bytes,
        handler_config: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """``handler_config`` replaces the API's handler.config (a batch job's merged config);
        ``extra`` adds constructor arguments (a batch job's ``job_spec``)."""
        self.api = api
        self.traced = tracing.active()
        # thread -> deadline of the call it runs (for the stuck-worker watchdog)
        self.busy: dict[int, float | None] = {}
        self.file = userproto.load(descriptors, api.protobuf_path) if descriptors else None
        cls = _handler_class(api)
        self.handler: Any = None
        available: dict[str, Any] = {
            "config": dict(api.handler_config if handler_config is None else handler_config),
            "metrics_client": MetricsClient(),
            **(extra or {}),
        }
        if self.file is not None:  # the service's messages, as the generated module offers them
            available["module_proto_pb2"] = types.SimpleNamespace(
                **{
                    name: message_factory.GetMessageClass(message)
                    for name, message in self.file.message_types_by_name.items()
                },
                DESCRIPTOR=self.file,
            )
        path_models = [s.name for s in api.sources if s.kind == "path"]
        if api.handler_type == "tensorflow":
            available["tensorflow_client"] = TensorFlowClient(
                gateway,
                api=api.name,
                models=path_models,
                signature_key=api.signature_key,
                timeout=config.gateway.handler_timeout,
                only_listed=all(s.kind == "path" for s in api.sources),
            )
        self.models: ModelClient | None = None
        if api.handler_type == "python" and api.sources:
            if not callable(getattr(cls, "load_model", None)):
                raise StartError(
                    f"{cls.__name__} must define load_model(self, model_path): the API sets "
                    "handler.multi_model_reloading"
                )
            self.models = ModelClient(
                self._load_model,
                api=api.name,
                names=path_models,
                cache_size=api.cache_size,
                disk_cache_size=api.disk_cache_size,
                disk_dir=cache_dir,
            )
            available["model_client"] = self.models
        kwargs: dict[str, Any] = {}
        for p in _params(cls)[0:]:
            if p.name in available:
                kwargs[p.name] = available[p.name]
            elif p.default is inspect.Parameter.empty and p.kind not in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ):
                raise StartError(
                    f"{cls.__name__}.__init__ takes {p.name!r}, which a {api.handler_type} handler "
                    f"does not get (it gets {', '.join(sorted(available))})"
                )
        try:
            self.handler = cls(**kwargs)
        except Exception as exc:
            raise StartError(f"{cls.__name__}.__init__ raised {type(exc).__name__}: {exc}") from exc
        self.entry = getattr(self.handler, "handle_post", None) or getattr(
            self.handler, "predict", None
        )
        # arguments bind by name (payload, query_params, headers); a first parameter with another
        # name (the older predict(self, sample) style) gets the payload
        names = [p.name for p in _params(self.entry)] if self.entry else []
        self.payload_positional = bool(names) and names[0] not in INVOKE_ARGS
        self.entry_args = [n for n in names if n in INVOKE_ARGS]
        # handle_async(payload, request_id) of an AsyncAPI: both optional, bound by name
        self.async_entry = getattr(self.handler, "handle_async", None)
        names = [p.name for p in _params(self.async_entry)] if self.async_entry else []
        self.async_positional = bool(names) and names[0] not in ASYNC_ARGS
        self.async_args = [n for n in names if n in ASYNC_ARGS]
        if api.kind == "AsyncAPI" and not callable(self.async_entry):
            raise StartError(f"{cls.__name__} has no handle_async method (the API is an AsyncAPI)")
        if api.kind == "BatchAPI" and not callable(getattr(self.handler, "handle_batch", None)):
            raise StartError(f"{cls.__name__} has no handle_batch method (the API is a BatchAPI)")
        if self.models is not None:
            self._follow(config.gateway.modelsync, self.models, config.gateway.modelsync_tls)

    def _load_model(self, path: str) -> Any:
        if self.handler is None:
            raise RuntimeError("get_model() cannot be called before __init__ returns")
        return self.handler.load_model(path)

    def _follow(self, address: str, client: ModelClient, tls: ClientTls | None) -> None:
        """Keeps ``client`` current from modelsync, on a thread of its own."""
        api = self.api.name

        async def run() -> None:
            follower: Follower

            def changed(_: object) -> None:
                client.update(follower.store_paths(api))

            def refused(problems: Problems) -> None:
                client.refuse(
                    {
                        model: refusal_text(versions)
                        for model, versions in problems.refused.items()
                        if problems.apis.get(model) == api
                    }
                )

            follower = Follower(address, changed, on_problems=refused, tls=tls)
            follower.start()
            await asyncio.Event().wait()

        threading.Thread(target=asyncio.run, args=(run(),), name="modelsync", daemon=True).start()

    # -- the request path -------------------------------------------------------------------

    def _begin(self, context: grpc.ServicerContext, rpc: str) -> tuple[str, bool]:
        request_id, debug = "", False
        if self.traced is not None:  # the call's span, current on this thread while it runs
            current.span = self.traced.server(rpc, context.invocation_metadata())
            current.trace_token = self.traced.current(current.span)
        for key, value in context.invocation_metadata():
            if key == "x-request-id":
                request_id = str(value)
            elif key == DEBUG_KEY:
                debug = str(value).lower() == "true"
        left = context.time_remaining()
        current.request_id = request_id
        # every line logged on this thread during the call (model_loaded, the handler's own)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        current.deadline = None if left is None else time.monotonic() + left
        context.set_trailing_metadata(MARK)
        self.busy[threading.get_ident()] = current.deadline
        return request_id, debug

    def _end(self, context: grpc.ServicerContext, failure: Exception | None) -> None:
        if self.traced is not None and current.span is not None:
            self.traced.restore(current.trace_token)
            self.traced.end(current.span, _code(context, failure))
            current.span = current.trace_token = None
        current.request_id, current.deadline = "", None
        structlog.contextvars.unbind_contextvars("request_id")
        self.busy.pop(threading.get_ident(), None)

    def _fail(self, context: grpc.ServicerContext, exc: Exception, request_id: str) -> None:
        if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]
            raise exc  # the handler set its status itself (context.abort): it stands
        if isinstance(exc, GatewayError):
            context.abort(exc.code, exc.message)
        if isinstance(exc, ResultError):  # the worker's conversion failed, not the handler
            log.error("handler_result_invalid", request_id=request_id, error=str(exc))
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"API {self.api.name!r}: {exc} (request id {request_id})",
            )
        log.error(
            "handler_failed",
            request_id=request_id,
            error=f"{type(exc).__name__}: {exc}",
            exc_info=exc,
        )
        context.abort(
            grpc.StatusCode.INTERNAL,
            f"the handler of API {self.api.name!r} raised {type(exc).__name__} "
            f"(request id {request_id}); the trace is in the gateway's log",
        )

    def invoke(
        self, request: inference_pb2.InvokeRequest, context: grpc.ServicerContext
    ) -> inference_pb2.InvokeResponse:
        request_id, debug = self._begin(context, INVOKE_RPC)
        failure: Exception | None = None
        try:
            if self.entry is None:
                raise Unimplemented(
                    f"the handler of API {self.api.name!r} has no handle_post or predict method"
                )
            kind = request.WhichOneof("payload")
            payload = (
                from_value(request.json)
                if kind == "json"
                else request.raw
                if kind == "raw"
                else None
            )
            args: dict[str, Any] = {
                "query_params": dict(request.query_params),
                "headers": self._headers(context, request.headers),
            }
            args["payload"] = payload
            positional = [payload] if self.payload_positional else []
            result = self.entry(*positional, **{n: args[n] for n in self.entry_args if n in args})
            if debug:
                shown = f"<{len(result)} bytes>" if isinstance(result, bytes) else plain(result)
                log.info(
                    "handler_debug", request_id=request_id, payload=_show(payload), result=shown
                )
            return _response(result)
        except Exception as exc:
            failure = exc
        finally:
            self._end(context, failure)
        self._fail(context, failure, request_id)
        raise AssertionError("unreachable")

    def handle_async(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        """Runs handle_async on the payload decoded by its content type. A handler's exception
        is INTERNAL with the exception's type and message (the request's error text; the trace
        goes to the log)."""
        request_id, _ = self._begin(context, "/".join(HANDLE_ASYNC))
        failure: Exception | None = None
        try:
            content_type = dict(context.invocation_metadata()).get(CONTENT_TYPE_KEY, "")
            payload = payloads.decode(body, str(content_type))
            args = {"payload": payload, "request_id": request_id}
            positional = [payload] if self.async_positional else []
            assert self.async_entry is not None
            result = self.async_entry(*positional, **{n: args[n] for n in self.async_args})
            return _response(result).SerializeToString()
        except Exception as exc:
            failure = exc
        finally:
            self._end(context, failure)
        if isinstance(failure, ResultError):
            log.error("handler_result_invalid", request_id=request_id, error=str(failure))
            context.abort(grpc.StatusCode.INTERNAL, str(failure))
        log.error(
            "handler_failed",
            request_id=request_id,
            error=f"{type(failure).__name__}: {failure}",
            exc_info=failure,
        )
        text = f"{type(failure).__name__}: {failure}"
        context.abort(grpc.StatusCode.INTERNAL, text if len(text) < 1000 else text[:1000] + " ...")
        raise AssertionError("unreachable")

    @staticmethod
    def _headers(context: grpc.ServicerContext, extra: Mapping[str, str]) -> dict[str, str]:
        headers = {
            k: v
            for k, v in context.invocation_metadata()
            if isinstance(v, str) and not k.startswith(("grpc-", ":"))
        }
        headers.update(extra)
        return headers

    # -- user-defined services ----------------------------------------------------------------

    def service_handlers(self) -> list[grpc.GenericRpcHandler]:
        out = []
        for service in userproto.services(self.file) if self.file is not None else ():
            methods = {m.name: self._method(service.full_name, m) for m in service.methods}
            out.append(grpc.method_handlers_generic_handler(service.full_name, methods))
        return out

    def _method(self, service: str, method: MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
        fn = getattr(self.handler, method.name, None)
        if not callable(fn):
            raise StartError(
                f"{type(self.handler).__name__} has no method {method.name}() for rpc "
                f"{service}/{method.name}"
            )
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        wants_context = "context" in [p.name for p in _params(fn)]
        shape = userproto.shape(method)
        rpc = f"{service}/{method.name}"

        def message(result: Any) -> Any:
            if isinstance(result, response_cls):
                return result
            what = response_cls.DESCRIPTOR.full_name
            if not isinstance(result, Mapping):
                raise ResultError(
                    f"{method.name}() returned a {type(result).__name__}, not a {what} or a dict"
                )
            try:
                return json_format.ParseDict(plain(result, protobuf_json=True), response_cls())
            except (json_format.ParseError, TypeError) as exc:
                raise ResultError(
                    f"{method.name}() returned a dict that is not a {what}: {exc}"
                ) from None

        def unary(payload: Any, context: grpc.ServicerContext) -> Any:
            request_id, debug = self._begin(context, rpc)
            failure: Exception | None = None
            try:
                result = message(fn(payload, context) if wants_context else fn(payload))
                if debug:
                    log.info(
                        "handler_debug",
                        request_id=request_id,
                        rpc=rpc,
                        payload=_show(payload),
                        result=_show(result),
                    )
                return result
            except Exception as exc:
                failure = exc
            finally:
                self._end(context, failure)
            self._fail(context, failure, request_id)
            raise AssertionError("unreachable")

        def streaming(payload: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            request_id, _ = self._begin(context, rpc)
            failure: Exception | None = None
            try:
                for item in fn(payload, context) if wants_context else fn(payload):
                    yield message(item)
                return
            except Exception as exc:
                failure = exc
            finally:
                self._end(context, failure)
            self._fail(context, failure, request_id)

        def parsed(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            """A client stream's messages, each parsed as the method reads it: INVALID_ARGUMENT
            for one that does not parse (grpc's deserializer would end the call with INTERNAL)."""
            for data in requests:
                try:
                    yield request_cls.FromString(data)
                except DecodeError:
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"request is not a valid {request_cls.DESCRIPTOR.full_name}",
                    )

        behaviour = streaming if method.server_streaming else unary
        make = getattr(grpc, f"{shape}_rpc_method_handler")
        return make(  # type: ignore[no-any-return]
            (lambda raw, context: behaviour(parsed(raw, context), context))
            if method.client_streaming
            else behaviour,
            request_deserializer=None if method.client_streaming else request_cls.FromString,
            response_serializer=response_cls.SerializeToString,
        )


def _code(context: grpc.ServicerContext, failure: Exception | None) -> grpc.StatusCode:
    """The status a handler call ends with, for its span."""
    if failure is None:
        return grpc.StatusCode.OK
    code = context.code()  # type: ignore[attr-defined]
    if code not in (None, grpc.StatusCode.OK):
        return code  # type: ignore[no-any-return]
    return failure.code if isinstance(failure, GatewayError) else grpc.StatusCode.INTERNAL


def _response(result: Any) -> inference_pb2.InvokeResponse:
    """A handler's return value: bytes as they are, anything else as JSON."""
    response = inference_pb2.InvokeResponse()
    if isinstance(result, bytes):
        response.raw = result
        return response
    try:
        json_format.ParseDict(plain(result), response.json)
    except (json_format.ParseError, TypeError) as exc:
        raise ResultError(f"the handler returned a value that is not JSON: {exc}") from None
    return response


def _show(value: Any) -> Any:
    """A payload or result for the debug log line."""
    if hasattr(value, "DESCRIPTOR"):
        return json_format.MessageToDict(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelmux-handler-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--api", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--socket", required=True, help="unix socket path to serve on")
    parser.add_argument(
        "--gateway", required=True, help="the gateway's address for tensorflow_client"
    )
    parser.add_argument(
        "--descriptors", default="", help="compiled FileDescriptorSet of protobuf_path"
    )
    parser.add_argument("--cache-dir", default="", help="local disk model cache")
    return parser


def main(argv: list[str] | None = None) -> int:
    supervision.watch_parent()  # first: a gateway that dies while this starts stops it too
    args = _parser().parse_args(argv)
    ready = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # from here on stdout is the log stream
    with open(args.config, "rb") as fh:
        config: Config = pickle.load(fh)  # the gateway's config as it loaded it
    logs.configure(
        level=config.gateway.log_level,
        component="handler",
        fields={"api": args.api, "handler_worker": args.index},
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        tracing.setup(configured=config.gateway.tracing, service="modelmux-handler")
        api = next(a for a in config.apis if a.name == args.api)
        descriptors = b""
        if args.descriptors:
            with open(args.descriptors, "rb") as fh:
                descriptors = fh.read()
        runtime = Runtime(
            config, api, gateway=args.gateway, cache_dir=args.cache_dir, descriptors=descriptors
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(api.threads_per_process, thread_name_prefix="handler"),
            options=[
                *message_size_options(config.gateway.max_message_bytes),
                *server_options(),
            ],
        )
        handlers = [
            grpc.method_handlers_generic_handler(
                "modelmux.v1.Inference",
                {
                    "Invoke": grpc.unary_unary_rpc_method_handler(
                        runtime.invoke,
                        request_deserializer=inference_pb2.InvokeRequest.FromString,
                        response_serializer=inference_pb2.InvokeResponse.SerializeToString,
                    )
                },
            )
        ]
        if api.kind == "AsyncAPI":
            handlers.append(
                grpc.method_handlers_generic_handler(
                    HANDLE_ASYNC[0],
                    {HANDLE_ASYNC[1]: grpc.unary_unary_rpc_method_handler(runtime.handle_async)},
                )
            )
        handlers.extend(runtime.service_handlers())
        server.add_generic_rpc_handlers(handlers)
        bind(server, f"unix:{args.socket}")  # refuses a path a live server holds
        server.start()
    except Exception as exc:
        if isinstance(exc, ListenError):  # its one line says it all
            log.error("handler_start_failed", error=str(exc))
        else:
            log.exception("handler_start_failed")
        known = isinstance(exc, StartError | ListenError | tracing.TracingError)
        reason = str(exc) if known else f"{type(exc).__name__}: {exc}"
        reason = reason if len(reason) < 4000 else reason[:4000] + " ..."
        ready.write(json.dumps({"failed": reason}) + "\n")
        ready.close()
        return 3
    ready.write(json.dumps({"ready": True}) + "\n")
    ready.close()
    log.info("handler_worker_ready", pid=os.getpid(), threads=api.threads_per_process)

    def watchdog() -> None:
        """Exits when every thread is stuck in a call long past its deadline: Python cannot stop
        a thread, so the gateway replaces the process."""
        while not stop.wait(1.0):
            now = time.monotonic()
            stuck = [
                t
                for t, d in list(runtime.busy.items())
                if d is not None and now > d + STUCK_GRACE and t not in loading
            ]
            if len(stuck) >= api.threads_per_process:
                log.error("handler_worker_stuck", threads=len(stuck), grace=STUCK_GRACE)
                sys.stderr.flush()
                os._exit(70)

    threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
    stop.wait()
    server.stop(config.gateway.shutdown_grace).wait()
    tracing.shutdown()  # exports the spans still buffered
    log.info("handler_worker_stopped", pid=os.getpid())
    sys.stderr.flush()
    os._exit(0)  # a handler thread still stuck in a call must not keep the process alive


if __name__ == "__main__":
    sys.exit(main())

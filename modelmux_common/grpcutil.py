"""gRPC plumbing shared by every modelmux server: listening, health, reflection, deadlines."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import inspect
import ipaddress
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from modelmux_common.listen import ListenError, ensure_free
from modelmux_common.tfserving_protos import reflection_pool

log = structlog.get_logger("modelmux")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


def reuse_freed_memory(keep_bytes: int) -> bool:
    """Has glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default every allocation over 32 MB is a fresh mmap and every free an munmap, so each large
    message costs a page fault per 4 KiB page of every buffer gRPC and Python copy it through; with
    this, freed buffers are reused (up to ``keep_bytes`` of free memory is retained) and a 40 MB
    message through a Python hop takes about half the CPU. Returns False where it does not apply.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    m_trim_threshold, m_mmap_max = -1, -4
    keep = min(keep_bytes, 2**31 - 1)  # mallopt takes a C int
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, keep))


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> HealthServicer:
    """Adds grpc.health.v1 and reflection (v1alpha, which grpcurl 1.8 and later speak), both
    answering INVALID_ARGUMENT to bytes that do not parse (see :func:`parsing`)."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, parsing(server))
    names = [*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME]
    # what reflection.enable_server_reflection does for an aio server, registered through parsing;
    # TF Serving's names are described from modelmux's own definitions where the process has no
    # others (the gateway: see modelmux_common.tfserving_protos)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        reflection.aio.ReflectionServicer(names, pool=reflection_pool()), parsing(server)
    )
    return health


class _Parsing:
    """Stands in for a server while generated code registers a servicer on it (the
    ``add_..._to_server`` functions call only these two methods)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_ParsingGeneric(h) for h in handlers])

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: _parsing_handler(h) for name, h in handlers.items()}
        )


def parsing(server: grpc.aio.Server) -> Any:
    """``server`` for an ``add_..._to_server`` call: each method then receives the request bytes
    and parses them itself, so that bytes that do not parse get INVALID_ARGUMENT naming the
    message. (When a deserializer raises, grpcio answers UNKNOWN "Unexpected <DecodeError>" and
    logs a traceback.) Async handlers, and sync unary ones (which the aio server then runs on
    its loop: generated stubs of methods the servicer does not implement); others as they are."""
    return _Parsing(server)


class _ParsingGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method not in self._wrapped:
            found = self._inner.service(handler_call_details)
            self._wrapped[method] = None if found is None else _parsing_handler(found)
        return self._wrapped[method]


def _decoder(deserializer: Callable[[bytes], Any]) -> Callable[[bytes, Any], Awaitable[Any]]:
    what = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = what.full_name if what is not None else "request message"

    async def decode(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {name}")

    return decode


def _parsing_handler(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    deserializer = handler.request_deserializer
    behaviour: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    is_async = inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)
    if deserializer is None or not (is_async or handler.unary_unary is not None):
        return handler
    decode = _decoder(deserializer)
    serializer = handler.response_serializer
    if not is_async:  # a generated base class's stub (grpc.health.v1's List on the aio servicer)
        inner_sync: Any = handler.unary_unary

        async def unary_sync(data: bytes, context: Any) -> Any:
            return inner_sync(await decode(data, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_sync, response_serializer=serializer)
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary_unary(data: bytes, context: Any) -> Any:
            return await inner_uu(await decode(data, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serializer)
    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream

        async def unary_stream(data: bytes, context: Any) -> AsyncIterator[Any]:
            request = await decode(data, context)
            if inspect.isasyncgenfunction(inner_us):
                async for item in inner_us(request, context):
                    yield item
            else:  # writes through context.write
                await inner_us(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serializer)

    async def requests(data: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
        async for raw in data:
            yield await decode(raw, context)

    if handler.stream_unary is not None:
        inner_su: Any = handler.stream_unary

        async def stream_unary(data: AsyncIterator[bytes], context: Any) -> Any:
            return await inner_su(requests(data, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serializer)
    inner_ss: Any = handler.stream_stream

    async def stream_stream(data: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
        if inspect.isasyncgenfunction(inner_ss):
            async for item in inner_ss(requests(data, context), context):
                yield item
        else:
            await inner_ss(requests(data, context), context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, response_serializer=serializer)


def bind(
    server: grpc.aio.Server | grpc.Server,
    address: str,
    *,
    shared_port: bool = False,
    credentials: grpc.ServerCredentials | None = None,
) -> str:
    """Binds ``address`` (host:port, [v6]:port or unix:path) and returns what was bound.

    Port 0 picks a free port; the returned address carries the real one. A taken address raises
    :class:`ListenError` (the server must be made with ``listen.server_options``): checked first,
    unless ``shared_port`` (a worker of ``gateway --workers N``, whose parent holds the port).
    With ``credentials`` (modelmux_common.security) the port speaks TLS only; without them a TCP
    address other than loopback logs a ``plaintext_listen`` warning.
    """
    if not shared_port:
        ensure_free(address)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # taken since the check (gRPC has logged why)
        raise ListenError(f"cannot listen on {address}") from None
    if credentials is None and not is_local(address):
        log.warning("plaintext_listen", address=address, hint="configure tls (docs/security.md)")
    if address.startswith("unix:"):
        return address
    if port == 0:  # what older gRPC releases return instead of raising
        raise ListenError(f"cannot listen on {address}")
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


def is_local(address: str) -> bool:
    """A unix socket or a loopback host: where plaintext stays the default without a warning."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remaining(context: grpc.aio.ServicerContext[object, object], ceiling: float) -> float:
    """Deadline for an outbound call: the smaller of the caller's remaining time and ``ceiling``."""
    left = context.time_remaining()
    return ceiling if left is None else max(0.0, min(left, ceiling))


async def run_until_signal(
    *,
    stop: Callable[[bool], Coroutine[object, object, None]],
    start: Callable[[], Awaitable[object]] | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """Runs ``start`` (when given) with the signal handlers already in place, so a daemon that
    says it is serving never dies of a SIGTERM's default action; waits for SIGINT/SIGTERM, then
    calls ``stop(False)``; a second signal calls ``stop(True)``. A signal during ``start`` stops
    once it has returned."""
    loop = asyncio.get_running_loop()
    first = asyncio.Event()
    forced = asyncio.Event()

    def on_signal() -> None:
        (forced if first.is_set() else first).set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        if start is not None:
            await start()
        await first.wait()
        graceful = asyncio.create_task(stop(False))
        force_wait = asyncio.create_task(forced.wait())
        done, _ = await asyncio.wait({graceful, force_wait}, return_when=asyncio.FIRST_COMPLETED)
        if force_wait in done:
            graceful.cancel()
            await stop(True)
        else:
            force_wait.cancel()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)

"""gRPC plumbing shared by every modelmux server: listening, health, reflection, deadlines."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from modelmux_common.listen import ListenError, ensure_free

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
    """Adds grpc.health.v1 and reflection (v1alpha, which grpcurl 1.8 and later speak)."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return health


def bind(server: grpc.aio.Server | grpc.Server, address: str, *, shared_port: bool = False) -> str:
    """Binds ``address`` (host:port, [v6]:port or unix:path) and returns what was bound.

    Port 0 picks a free port; the returned address carries the real one. A taken address raises
    :class:`ListenError` (the server must be made with ``listen.server_options``): checked first,
    unless ``shared_port`` (a worker of ``gateway --workers N``, whose parent holds the port).
    """
    if not shared_port:
        ensure_free(address)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # taken since the check (gRPC has logged why)
        raise ListenError(f"cannot listen on {address}") from None
    if address.startswith("unix:"):
        return address
    if port == 0:  # what older gRPC releases return instead of raising
        raise ListenError(f"cannot listen on {address}")
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


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

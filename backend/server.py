"""``modelmux backend``: settings, the grpc.aio server, start-up and orderly shutdown."""

from __future__ import annotations

import argparse
import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import structlog
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from backend.errors import ServingError
from backend.manager import ModelManager
from backend.metrics import States
from backend.modelconfig import ModelSpec, read_config_file
from backend.services import Device, ModelService, PredictionService
from backend.tfserving import model_service_pb2, prediction_service_pb2
from modelmux_common import config as mm_config
from modelmux_common import grpcutil, logs
from modelmux_common.config import Accelerator, ConfigError, ServerTls
from modelmux_common.listen import server_options
from modelmux_common.metrics import Endpoint
from modelmux_common.security import TlsError, check_ca, check_certificate, server_credentials

log = structlog.get_logger("modelmux.backend")

DEFAULT_LISTEN = "127.0.0.1:9000"
DEFAULT_ACCELERATOR: Accelerator = "cpu"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SHUTDOWN_GRACE_SECONDS = 5.0
LOAD_THREADS = 2
SERVICE_NAMES = (
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    accelerator: Accelerator = DEFAULT_ACCELERATOR
    poll_interval: float = 1.0
    models: tuple[ModelSpec, ...] | None = None  # from --model-config-file
    max_message_bytes: int = MAX_MESSAGE_BYTES
    device: Device | None = None  # --device-time / --device-slots
    tls: ServerTls | None = None  # --tls-cert / --tls-key / --tls-client-ca
    metrics_listen: str = ""  # the backends entry's metrics_listen

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """Defaults < the ``backends`` entry named ``--name`` in ``--config`` < explicit flags."""
        listen, accelerator, metrics_listen = DEFAULT_LISTEN, DEFAULT_ACCELERATOR, ""
        if getattr(args, "config", None) and getattr(args, "name", None):
            entry = _backend_entry(args.config, args.name)
            listen, accelerator = entry.address, entry.accelerator
            metrics_listen = entry.metrics_listen
        try:
            poll_interval = mm_config.parse_duration(getattr(args, "poll_interval", "1s"))
        except ValueError as exc:
            raise ConfigError("<command line>", "--poll-interval", str(exc)) from exc
        device = None
        try:
            device_time = mm_config.parse_duration(getattr(args, "device_time", "0s"))
        except ValueError as exc:
            raise ConfigError("<command line>", "--device-time", str(exc)) from exc
        slots = getattr(args, "device_slots", 1)
        if slots < 1:
            raise ConfigError(
                "<command line>", "--device-slots", f"must be at least 1, not {slots}"
            )
        if device_time > 0:
            device = Device(device_time, slots)
        model_file = getattr(args, "model_config_file", None)
        models = read_config_file(model_file) if model_file else None
        return cls(
            listen=getattr(args, "listen", None) or listen,
            accelerator=getattr(args, "accelerator", None) or accelerator,
            poll_interval=poll_interval,
            models=tuple(models) if models is not None else None,
            device=device,
            tls=_tls(args),
            metrics_listen=metrics_listen,
        )


def _tls(args: argparse.Namespace) -> ServerTls | None:
    """The --tls-* flags, checked (ConfigError naming the flag)."""
    cert, key, ca = (getattr(args, f"tls_{k}", None) for k in ("cert", "key", "client_ca"))
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise ConfigError("<command line>", "--tls-cert", "--tls-cert and --tls-key go together")
    paths = [os.path.abspath(p) if p else "" for p in (cert, key, ca)]
    for flag, path in zip(("--tls-cert", "--tls-key", "--tls-client-ca"), paths, strict=True):
        if path and not os.path.isfile(path):
            raise ConfigError("<command line>", flag, f"{path} does not exist")
    try:
        check_certificate(paths[0], paths[1])
        if paths[2]:
            check_ca(paths[2])
    except TlsError as exc:
        raise ConfigError("<command line>", "--tls-*", str(exc)) from None
    return ServerTls(cert=paths[0], key=paths[1], client_ca=paths[2])


def _backend_entry(path: str, name: str) -> mm_config.BackendConfig:
    loaded = mm_config.load(path)
    for entry in loaded.backends:
        if entry.name == name:
            return entry
    known = ", ".join(b.name for b in loaded.backends) or "none"
    raise ConfigError(path, "backends", f"no backend named {name!r}; backends: {known}")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``modelmux backend``; returns the process exit code."""
    name = getattr(args, "name", None)
    logs.configure(component=f"backend {name}" if name else "backend")
    settings = Settings.from_args(args)
    asyncio.run(serve(settings))
    return 0


def build_server(manager: ModelManager, settings: Settings) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            *grpcutil.message_size_options(settings.max_message_bytes),
            *server_options(),
        ]
    )
    # parsing: bytes that do not parse are INVALID_ARGUMENT, as with TF Serving (not UNKNOWN)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, settings.device), grpcutil.parsing(server)
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelService(manager), grpcutil.parsing(server)
    )
    return server


async def serve(settings: Settings) -> None:
    """Runs the backend until SIGINT/SIGTERM (a second signal skips the grace period)."""
    with ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="model-load") as executor:
        manager = ModelManager(accelerator=settings.accelerator, executor=executor)
        server = build_server(manager, settings)
        health = grpcutil.add_health_and_reflection(server, SERVICE_NAMES)
        credentials = server_credentials(settings.tls, what="backend")
        address = grpcutil.bind(server, settings.listen, credentials=credentials)
        metrics = _metrics(settings, manager)
        await server.start()
        if settings.models is not None:
            await _apply_start_config(manager, list(settings.models))
        for name in ("", *SERVICE_NAMES):
            await health.set(name, grpcutil.SERVING)
        stop_polling = asyncio.Event()
        poller = asyncio.create_task(_poll(manager, settings.poll_interval, stop_polling))
        log.info("serving", address=address, accelerator=settings.accelerator)

        async def stop(force: bool) -> None:
            await health.enter_graceful_shutdown()
            stop_polling.set()
            await server.stop(0 if force else SHUTDOWN_GRACE_SECONDS)

        try:
            await grpcutil.run_until_signal(stop=stop)
        finally:
            if metrics is not None:
                metrics.close()
            stop_polling.set()
            await poller  # the poll's wait is interruptible: it returns as soon as stop is set
            await manager.close()
            await server.stop(0)
            executor.shutdown(wait=False, cancel_futures=True)
    log.info("stopped", address=address)


def _metrics(settings: Settings, manager: ModelManager) -> Endpoint | None:
    """``/metrics`` when the backend's entry sets ``metrics_listen`` (a busy address fails)."""
    if not settings.metrics_listen:
        return None
    metrics = Endpoint(
        settings.metrics_listen,
        key="backends[].metrics_listen",
        collectors=[States(manager.state_counts)],
    )
    log.info("metrics", address=settings.metrics_listen, port=metrics.port)
    return metrics


async def _apply_start_config(manager: ModelManager, specs: list[ModelSpec]) -> None:
    """Loads ``--model-config-file`` before reporting ``serving``; label problems are logged."""
    try:
        await manager.apply(specs)
    except ServingError as exc:
        log.error("model config not fully applied", error=exc.message)


async def _poll(manager: ModelManager, interval: float, stop: asyncio.Event) -> None:
    if interval > 0:
        await manager.poll(interval, stop)

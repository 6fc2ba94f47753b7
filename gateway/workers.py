"""``modelmux gateway --workers N``: N gateway processes sharing one listening port.

The kernel spreads *connections* over the processes (SO_REUSEPORT), not calls: a client with one
channel talks to one worker, so sidecar clients should open several channels. Every worker follows
modelsync and keeps its own routing state; only worker 0 pushes model configs to the backends,
the others watch the backends' status, so the backends see one owner of their configuration.

With ``gateway.metrics_listen`` set, the workers keep their metrics in prometheus_client's
multiprocess files in one folder, and this process serves ``/metrics`` from it: one scrape gives
the totals over the workers (docs/metrics.md).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile

import structlog

from modelmux_common import supervision
from modelmux_common.config import Config
from modelmux_common.listen import ensure_free, split
from modelmux_common.metrics import MULTIPROC_ENV, Endpoint

log = structlog.get_logger("modelmux.gateway")

# What a worker gets past gateway.shutdown_grace to finish its stop before it is killed.
STOP_MARGIN = 5.0


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Binds (without listening) the address so port 0 becomes one concrete port for all workers.

    The workers bind it with SO_REUSEPORT, which the kernel lets any process of this user share:
    so the address is checked first with a bind that does not set it, which fails when another
    process holds the port, with or without SO_REUSEPORT (:func:`ensure_free`).
    """
    ensure_free(listen)
    host, port = split(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return sock, f"{shown}:{sock.getsockname()[1]}"


def supervise(config: Config, args: argparse.Namespace, workers: int) -> int:
    """Starts the workers, forwards SIGINT/SIGTERM to them, and exits once they all have."""
    reserved, address = reserve_port(config.gateway.listen)
    folder, metrics = "", None
    if config.gateway.metrics_listen:
        folder = tempfile.mkdtemp(prefix="modelmux-metrics-")
        try:
            metrics = Endpoint(
                config.gateway.metrics_listen, folder, key="gateway.metrics_listen", own=False
            )
        except BaseException:
            reserved.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info(
            "metrics", address=config.gateway.metrics_listen, port=metrics.port, workers=workers
        )
    try:
        return _run(config, args, workers, address, {MULTIPROC_ENV: folder} if folder else {})
    finally:
        reserved.close()
        if metrics is not None:
            metrics.close()
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _run(
    config: Config, args: argparse.Namespace, workers: int, address: str, env: dict[str, str]
) -> int:
    children = [
        supervision.spawn(
            [
                sys.executable,
                "-m",
                "modelmux_common.cli",
                "gateway",
                "--config",
                args.config,
                "--listen",
                address,
                "--workers",
                str(workers),
                "--worker-index",
                str(index),
                *(["--strict"] if getattr(args, "strict", False) else []),
            ],
            env=env,
        )
        for index in range(workers)
    ]
    supervision.forward_signals(children, grace=config.gateway.shutdown_grace + STOP_MARGIN)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)

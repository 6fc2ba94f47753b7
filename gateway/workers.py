"""``modelmux gateway --workers N``: N gateway processes sharing one listening port.

The kernel spreads *connections* over the processes (SO_REUSEPORT), not calls: a client with one
channel talks to one worker, so sidecar clients should open several channels. Every worker follows
modelsync and keeps its own routing state; only worker 0 pushes model configs to the backends,
the others watch the backends' status, so the backends see one owner of their configuration.
"""

from __future__ import annotations

import argparse
import socket
import sys

from modelmux_common import supervision
from modelmux_common.config import Config
from modelmux_common.listen import ensure_free, split

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
            ]
        )
        for index in range(workers)
    ]
    supervision.forward_signals(children, grace=config.gateway.shutdown_grace + STOP_MARGIN)
    try:
        codes = [child.wait() for child in children]
    finally:
        reserved.close()
    return max(codes, key=abs)

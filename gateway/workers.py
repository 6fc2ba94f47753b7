"""``modelmux gateway --workers N``: N gateway processes sharing one listening port.

The kernel spreads *connections* over the processes (SO_REUSEPORT), not calls: a client with one
channel talks to one worker, so sidecar clients should open several channels. Every worker follows
modelsync and keeps its own routing state; only worker 0 pushes model configs to the backends,
the others watch the backends' status, so the backends see one owner of their configuration.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
from types import FrameType

from modelmux_common.config import Config, ConfigError


def reserve_port(listen: str, file: str) -> tuple[socket.socket, str]:
    """Binds (without listening) the address so port 0 becomes one concrete port for all workers."""
    if listen.startswith("unix:"):
        raise ConfigError(
            file, "gateway.listen", "several workers need a TCP address, not a unix socket"
        )
    host, _, port = listen.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), int(port)))
    return sock, f"{host}:{sock.getsockname()[1]}"


def supervise(config: Config, args: argparse.Namespace, workers: int) -> int:
    """Starts the workers, forwards SIGINT/SIGTERM to them, and exits once they all have."""
    reserved, address = reserve_port(config.gateway.listen, config.file)
    children = [
        subprocess.Popen(
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
            # own process group: a Ctrl-C in a terminal reaches the workers once, through here
            start_new_session=True,
        )
        for index in range(workers)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        codes = [child.wait() for child in children]
    finally:
        reserved.close()
    return max(codes, key=abs)

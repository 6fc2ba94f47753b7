"""The ``modelmux`` command: ``backend``, ``gateway``, ``sync`` and ``up``.

Each subcommand imports its daemon lazily, so ``modelmux gateway`` never loads the TensorFlow
runtime that ``modelmux backend`` needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from modelmux_common.config import ACCELERATORS, ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelmux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backend = sub.add_parser("backend", help="the embedded TF-Serving-compatible backend")
    backend.add_argument(
        "--config", help="modelmux YAML; with --name, listen/accelerator come from it"
    )
    backend.add_argument("--name", help="which entry of the config's backends section this is")
    backend.add_argument("--listen", help="host:port or unix:path (default 127.0.0.1:9000)")
    backend.add_argument(
        "--accelerator", choices=ACCELERATORS, help="accelerator label (default cpu)"
    )
    backend.add_argument(
        "--model-config-file", help="a ModelServerConfig in text format to load at start"
    )
    backend.add_argument(
        "--poll-interval", default="1s", help="how often base paths are re-scanned"
    )
    backend.add_argument(
        "--device-time",
        default="0s",
        help="stand-in for an accelerator (benchmarks): each Predict also holds a device slot "
        "this long, without CPU (default 0s: off)",
    )
    backend.add_argument(
        "--device-slots", type=int, default=1, help="Predicts on the device at once (default 1)"
    )

    gateway = sub.add_parser("gateway", help="the gateway")
    gateway.add_argument("--config", required=True, help="modelmux YAML")
    gateway.add_argument("--listen", help="override gateway.listen")
    gateway.add_argument(
        "--workers", type=int, help="override gateway.workers (processes sharing the port)"
    )
    gateway.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    gateway.add_argument(
        "--strict",
        action="store_true",
        help="fail start-up (exit 1) when a model cannot be served, instead of serving the others",
    )

    sync = sub.add_parser("sync", help="the modelsync daemon")
    sync.add_argument("--config", required=True, help="modelmux YAML")
    sync.add_argument("--listen", help="override modelsync.listen")
    sync.add_argument("--target", help="override modelsync.target")
    sync.add_argument("--once", action="store_true", help="mirror once and exit")

    up = sub.add_parser("up", help="start embedded backends, modelsync and the gateway together")
    up.add_argument("--config", required=True, help="modelmux YAML")
    up.add_argument(
        "--strict",
        action="store_true",
        help="stop when a model cannot be served (gateway --strict), instead of serving the others",
    )
    return parser


_COMMANDS = {
    "backend": "backend.server",
    "gateway": "gateway.server",
    "sync": "modelsync.daemon",
    "up": "modelmux_common.up",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        module = importlib.import_module(_COMMANDS[args.command])
        code: int = module.main(args)
        return code
    except ConfigError as exc:
        print(f"modelmux {args.command}: bad config: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``modelmux`` command: ``backend``, ``gateway``, ``sync``, ``up`` and ``worker``, and
``job`` (a client of a gateway's batch jobs: modelmux_common/jobargs.py and jobcli.py).

Each subcommand imports its daemon lazily, so ``modelmux gateway`` never loads the TensorFlow
runtime that ``modelmux backend`` needs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence

from modelmux_common import jobargs, supervision
from modelmux_common.config import ACCELERATORS, ConfigError, load
from modelmux_common.listen import ListenError

DESCRIPTION = """\
modelmux: a gRPC-first inference gateway for TensorFlow Serving backends, with modelsync, which
mirrors model folders from S3 or a local folder onto the volume the backends read. One YAML file
configures every command; "modelmux up --config FILE" starts the whole stack on one machine."""

# A line of TensorFlow's C++ logging (absl / TSL): "I0000 00:00:1796223555.543744  14335 port.cc:153]"
_CXX_LOG_LINE = re.compile(
    rb"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IWEF]\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\])"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelmux", description=DESCRIPTION)
    parser.add_argument("--version", action=_Version)
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
    backend.add_argument("--tls-cert", help="TLS: the server's certificate chain (PEM)")
    backend.add_argument("--tls-key", help="TLS: its private key (PEM)")
    backend.add_argument(
        "--tls-client-ca", help="mutual TLS: CA certificates (PEM) client certificates need"
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

    worker = sub.add_parser(
        "worker", help="a batch worker: runs a BatchAPI's jobs from the shared job store"
    )
    batch_worker_options(worker)

    up = sub.add_parser("up", help="start embedded backends, modelsync and the gateway together")
    up.add_argument("--config", required=True, help="modelmux YAML")
    up.add_argument(
        "--strict",
        action="store_true",
        help="stop when a model cannot be served (gateway --strict), instead of serving the others",
    )
    jobargs.add_parser(sub)
    return parser


def batch_worker_options(parser: argparse.ArgumentParser) -> None:
    """``modelmux worker``'s options (also those of the workers a gateway starts itself)."""
    parser.add_argument("--config", default="", help="modelmux YAML (required)")
    # the gateway's workers: the config as the gateway loaded it, pickled
    parser.add_argument("--snapshot", default="", help=argparse.SUPPRESS)
    parser.add_argument("--api", required=True, help="the BatchAPI whose jobs to run")
    parser.add_argument("--job", default="", help="run only this job, then exit")
    parser.add_argument(
        "--gateway",
        default="",
        help="the gateway tensorflow_client calls (default: the config's gateway.listen)",
    )
    parser.add_argument(
        "--metrics-listen", default="", help="host:port of this worker's Prometheus /metrics"
    )


class _Version(argparse.Action):
    """``--version``, looked up only when asked for (reading the package metadata takes time)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        try:
            version = importlib.metadata.version("modelmux")
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed: run from a source tree)"
        print(f"modelmux {version}")  # on stdout, as argparse's own version action
        parser.exit()


# what only the embedded backend needs: absent from a gateway-only install (no backend extra)
_BACKEND_ONLY = ("backend", "tensorflow", "tensorflow_serving")

_COMMANDS = {
    "backend": "backend.server",
    "gateway": "gateway.server",
    "sync": "modelsync.daemon",
    "up": "modelmux_common.up",
    "worker": "gateway.batchapi.worker",
    "job": "modelmux_common.jobcli",
}


def main(argv: Sequence[str] | None = None) -> int:
    supervision.watch_parent()  # first: a parent that dies while this starts stops it too
    args = _parser().parse_args(argv)
    try:
        if args.command == "backend":
            with _quiet_tensorflow(args):
                module = importlib.import_module(_COMMANDS[args.command])
        else:
            module = importlib.import_module(_COMMANDS[args.command])
        code: int = module.main(args)
        return code
    except ConfigError as exc:
        print(f"modelmux {args.command}: bad config: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"modelmux {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        if args.command != "backend" or (exc.name or "").split(".")[0] not in _BACKEND_ONLY:
            raise
        print(
            f"modelmux backend: the embedded backend is not installed here ({exc.name} is "
            "missing): install modelmux with its backend extra, pip install 'modelmux[backend]'",
            file=sys.stderr,
        )
        return 1


@contextlib.contextmanager
def _quiet_tensorflow(args: argparse.Namespace) -> Iterator[None]:
    """TensorFlow's C++ logging off, and CUDA hidden from a ``cpu`` backend, while it loads.

    Its C++ logging (a cuInit error on a machine without a GPU, oneDNN notices) would otherwise
    fill the terminal; the backend's own log says what matters (a version that fails to load and
    why). Some of those lines are written while the libraries load, before any log level applies,
    so stderr is filtered for them during the import. Setting ``TF_CPP_MIN_LOG_LEVEL`` yourself
    (``TF_CPP_MIN_LOG_LEVEL=0`` shows everything) turns all of this off, and
    ``CUDA_VISIBLE_DEVICES`` set yourself is kept.
    """
    accelerator = args.accelerator
    if accelerator is None and args.config and args.name:  # read again by the backend: cheap
        entries = {b.name: b.accelerator for b in load(args.config).backends}
        accelerator = entries.get(args.name)
    if (accelerator or "cpu") == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # errors too: cuInit's is one
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured if not _CXX_LOG_LINE.match(line)]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())

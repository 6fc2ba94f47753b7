"""A gRPC health probe for containers: ``python -m modelmux.client.probe [ADDRESS] [--service S]``.

ADDRESS defaults to ``$MODELMUX_PROBE_ADDRESS``, else 127.0.0.1:8500. Exits 0 when
``grpc.health.v1.Health/Check`` answers SERVING, 1 when it answers anything else, 2 when it cannot
ask (no answer within the timeout, an unknown service). Works on TCP addresses and ``unix:``
sockets, which Kubernetes' built-in ``grpc`` probe cannot reach.
"""

from __future__ import annotations

import argparse
import os
import sys

from modelmux.client.errors import ModelmuxError
from modelmux.client.options import DEFAULT_TARGET
from modelmux.client.sync import Client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelmux.client.probe", description=__doc__)
    default = os.environ.get("MODELMUX_PROBE_ADDRESS", DEFAULT_TARGET)
    parser.add_argument("address", nargs="?", default=default)
    parser.add_argument("--service", default="", help='health service name ("" = overall)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    with Client(args.address, timeout=args.timeout, retry=None) as client:
        try:
            status = client.health(args.service)
        except ModelmuxError as exc:
            print(f"{args.address}: {exc}", file=sys.stderr)
            return 2
    if status != "SERVING":
        print(f"{args.address} {args.service or '(overall)'}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

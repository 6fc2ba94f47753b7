"""The bare hop: the least a Python gRPC proxy can do, as the floor the gateway is measured against.

A grpc.aio server with one generic handler and no (de)serializers: the request bytes of
``/tensorflow.serving.PredictionService/Predict`` go to the backend as they came, the response bytes
come back the same way. No routing, no deadline arithmetic, no logging, no metrics, no health.
It runs on asyncio's own event loop, as the issue defines it; ``--loop uvloop`` runs it on uvloop,
the gateway's loop, for a like-for-like comparison.

    python scripts/bench_barehop.py --listen 127.0.0.1:0 --backend 127.0.0.1:9000

Logs ``{"event": "serving", "address": ...}`` on stderr once it accepts calls; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import grpc
import uvloop

PREDICT = "/tensorflow.serving.PredictionService/Predict"


class Forward(grpc.GenericRpcHandler):
    """Answers Predict by sending its bytes to the backend; every other method is UNIMPLEMENTED."""

    def __init__(self, backend: grpc.aio.Channel) -> None:
        self._call = backend.unary_unary(PREDICT)
        self._handler = grpc.unary_unary_rpc_method_handler(self._forward)

    async def _forward(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            response: bytes = await self._call(request)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        return response

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handler if handler_call_details.method == PREDICT else None


async def serve(listen: str, backend: str, max_bytes: int) -> None:
    options = [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]
    channel = grpc.aio.insecure_channel(backend, options=options)
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((Forward(channel),))
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rsplit(":", 1)[0]
    print(json.dumps({"event": "serving", "address": f"{host}:{port}"}), file=sys.stderr)
    sys.stderr.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    await channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--backend", required=True, help="host:port of a TF Serving backend")
    parser.add_argument("--max-message-bytes", type=int, default=128 * 1024 * 1024)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    run = uvloop.run if args.loop == "uvloop" else asyncio.run
    run(serve(args.listen, args.backend, args.max_message_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

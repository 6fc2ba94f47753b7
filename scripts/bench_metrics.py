"""The ``metrics`` scenario of scripts/bench.py: what Prometheus metrics add to the request path's
own Python work per call, measured in-process without gRPC, so that the figure is not lost in the
noise of a shared machine (the ``facade-latest-metrics`` target measures the same end to end).

One process builds the gateway's request path twice, metrics off and on (edge, facade,
admission, forwarding, over an in-memory backend that answers at once), and runs the same
Predict through each in alternation, ``rounds`` times ``calls`` calls, reading the process's CPU
time around each batch. The added microseconds per call are then compared with the CPU per call
of the gateway process (facade-latest in the small scenario, when it ran).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from gateway.admission import Admission
from gateway.api.facade import Facade
from gateway.catalog import single_servable
from gateway.edge import Lifecycle, RawHandler, edge
from gateway.fleet.fleet import Fleet
from gateway.forwarding import Forwarder
from gateway.metrics import RequestMetrics
from gateway.transport import AVAILABLE, MemoryTransport, VersionStatus
from modelmux_common import logs
from modelmux_common.config import BackendConfig, GatewayConfig
from modelmux_common.tfserving import predict_pb2

RPC = "tensorflow.serving.PredictionService/Predict"


class _Context:
    """What the request path reads of a grpc.aio servicer context."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def add_done_callback(self, callback: Any) -> None:
        callback(self)  # as if the status were sent at once

    def done(self) -> bool:
        return False


async def _path(reply: bytes, *, metrics: bool) -> RawHandler:
    async def answer(method: str, data: bytes) -> bytes:
        await asyncio.sleep(0)  # suspended once, as on a real channel
        return reply

    statuses = {"m": {1: VersionStatus(AVAILABLE)}}
    transport = MemoryTransport(answer, statuses=statuses)
    fleet = Fleet(
        config=GatewayConfig(),
        backends=[BackendConfig("b", "b.test:8500")],
        models={"m": single_servable("m", "api", False, "/models/m", (1,), False)},
        labels={},
        transport=lambda _: transport,
    )
    await fleet.reconcilers[0].round()
    recorder = RequestMetrics(lambda name: name in fleet.table.known) if metrics else None
    forwarder = Forwarder(timeout=5.0, backend_max_inflight=64, metrics=recorder)
    admission = Admission(forwarder.send, max_inflight=64, metrics=recorder)
    route = recorder.route(RPC) if recorder is not None else None
    facade = Facade(fleet, admission.send)
    return edge(
        RPC, facade.forwarding("Predict"), log_requests=False, lifecycle=Lifecycle(), metrics=route
    )


async def _measure(rounds: int, calls: int) -> dict[str, list[float]]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].float_val.extend([1.0, 2.0, 5.0])
    reply = predict_pb2.PredictResponse()
    reply.outputs["y"].float_val.extend([2.5, 3.0, 4.5])
    data, answer = request.SerializeToString(), reply.SerializeToString()
    paths = {"off": await _path(answer, metrics=False), "on": await _path(answer, metrics=True)}
    out: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for name, run in paths.items():
            started = time.process_time()
            for _ in range(calls):
                await run(data, _Context())  # type: ignore[arg-type]
            out[name].append((time.process_time() - started) / calls * 1e6)
    return out


def request_path(*, rounds: int = 15, calls: int = 5000, hop_cpu_us: float = 0.0) -> dict[str, Any]:
    """Medians over rounds of the request path's CPU per call, off and on, and what that adds
    to a gateway call of ``hop_cpu_us`` (the small scenario's facade-latest, when measured)."""
    logs.configure(level="warning", component="bench")  # the fleet's lines are not the point here
    figures = asyncio.run(_measure(rounds, calls))
    off, on = statistics.median(figures["off"]), statistics.median(figures["on"])
    result: dict[str, Any] = {
        "rounds": rounds,
        "calls": calls,
        "off_us": off,
        "on_us": on,
        "added_us": on - off,
        "per_round": figures,
    }
    if hop_cpu_us > 0:
        result["facade_cpu_us"] = hop_cpu_us
        result["x_facade"] = (hop_cpu_us + on - off) / hop_cpu_us
    return result

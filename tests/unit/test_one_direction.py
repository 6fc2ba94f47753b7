"""The request path goes one way: a facade Predict enters each gateway module once, top to
bottom, and never calls back into a module it has left; gateway/ has no import cycle.

The call is traced with ``sys.setprofile``: every new frame of a gateway module is recorded
with the gateway modules above it. A frame whose nearest gateway caller is another module is an
*entry* into its module; each module must be entered exactly once. (Code that dataclasses
generate, e.g. ``Resolved.__init__``, has no source file and is not counted.)
"""

from __future__ import annotations

import ast
import asyncio
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.admission import Admission
from gateway.api.facade import Facade
from gateway.api.inference import Inference
from gateway.batching import Batching, Policy
from gateway.catalog import single_servable
from gateway.edge import Call, Lifecycle, edge
from gateway.fleet.fleet import Fleet
from gateway.forwarding import Forwarder
from gateway.transport import AVAILABLE, MemoryTransport, VersionStatus
from modelmux.v1 import inference_pb2
from modelmux_common.config import BackendConfig, GatewayConfig
from modelmux_common.tfserving import get_model_metadata_pb2, predict_pb2
from unit.unit_helpers import Context, predict_reply

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "gateway"


def _module(frame: FrameType) -> str | None:
    path = Path(frame.f_code.co_filename)
    if not path.is_relative_to(GATEWAY):
        return None
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class Trace:
    """The gateway modules a call crosses: each entry with the chain of modules above it."""

    def __init__(self) -> None:
        self.frames: dict[int, FrameType] = {}  # every frame seen (kept: ids stay unique)
        self.entries: list[tuple[str, tuple[str, ...]]] = []
        self.names: Counter[tuple[str, str]] = Counter()  # (module, function) -> new frames

    def __enter__(self) -> Trace:
        sys.setprofile(self._event)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)

    def _event(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or id(frame) in self.frames:
            return  # a coroutine resumed is not a new call
        module = _module(frame)
        if module is None:
            return
        self.frames[id(frame)] = frame
        self.names[(module, frame.f_code.co_name)] += 1
        above: list[str] = []
        caller = frame.f_back
        while caller is not None:
            name = _module(caller)
            if name is not None and (not above or above[-1] != name):
                above.append(name)
            caller = caller.f_back
        if not above or above[0] != module:
            self.entries.append((module, tuple(reversed(above))))

    @property
    def order(self) -> list[str]:
        return [module for module, _ in self.entries]


async def _fleet(handler: Any) -> Fleet:
    """A fleet of one in-memory backend serving m versions 1 and 2, after one reconcile round."""
    transport = MemoryTransport(
        handler, statuses={"m": {1: VersionStatus(AVAILABLE), 2: VersionStatus(AVAILABLE)}}
    )
    fleet = Fleet(
        config=GatewayConfig(),
        backends=[BackendConfig("b", "b.test:8500")],
        models={"m": single_servable("m", "api", False, "/models/m", (1, 2), False)},
        labels={},
        transport=lambda _: transport,
    )
    assert await fleet.reconcilers[0].round()
    assert transport.configs and set(fleet.table.routes["m"].versions) == {1, 2}
    return fleet


def _path(fleet: Fleet) -> Admission:
    forwarder = Forwarder(timeout=5.0, backend_max_inflight=10)
    batching = Batching(forwarder.send, {"api": Policy(8)}, max_bytes=1 << 20, tables=fleet)
    return Admission(batching.send, max_inflight=10)


async def _answer(method: str, data: bytes) -> bytes:
    await asyncio.sleep(0)  # the call is suspended once, as on a real channel
    if method == "GetModelMetadata":
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def["serving_default"].inputs["x"].dtype = 1
        reply = get_model_metadata_pb2.GetModelMetadataResponse()
        reply.metadata["signature_def"].Pack(signatures)
        return bytes(reply.SerializeToString())
    return predict_reply()


async def test_a_facade_predict_crosses_each_module_once_top_to_bottom() -> None:
    fleet = await _fleet(_answer)
    facade = Facade(fleet, _path(fleet).send)
    run = edge(
        "PredictionService/Predict",
        facade.forwarding("Predict"),
        log_requests=True,
        lifecycle=Lifecycle(),
    )
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].float_val.append(1.0)
    context: Any = Context()
    with Trace() as trace:
        reply = await run(request.SerializeToString(), context)
    context.finish()
    assert predict_pb2.PredictResponse.FromString(reply).outputs["y"].float_val == [1.0]
    assert trace.order == [
        "gateway.edge",
        "gateway.api.facade",
        "gateway.request",
        "gateway.routing",
        "gateway.admission",
        "gateway.batching",
        "gateway.forwarding",
        "gateway.transport",
    ], trace.entries
    for module, above in trace.entries:  # each entered from modules above it, in their order
        places = [trace.order.index(m) for m in (*above, module)]
        assert places == sorted(set(places)), (module, above)
    await fleet.close()


async def test_a_json_predict_resolves_its_route_once() -> None:
    fleet = await _fleet(_answer)
    api = Inference(fleet, _path(fleet).send)
    inputs = inference_pb2.PredictRequest(model="m")
    inputs.json_inputs.update({"x": [1.0]})
    context: Any = Context()
    with Trace() as trace:  # the first call also fetches the signature
        await api.predict(inputs.SerializeToString(), context, Call(context))
    assert trace.names[("gateway.routing", "resolve")] == 1
    assert trace.names[("gateway.request", "resolve")] == 1
    assert trace.names[("gateway.transport", "forward")] == 2  # metadata, then Predict
    await fleet.close()


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The gateway modules a module imports, wherever in it (TYPE_CHECKING blocks included);
    ``from package import module`` imports the module."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            named = {f"{base}.{a.name}" for a in node.names}
            out |= (named & modules) or {base}
    return out & modules


def test_gateway_has_no_import_cycle() -> None:
    modules = {}
    for path in GATEWAY.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: sorted(_imports(path, set(modules)) - {name}) for name, path in modules.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in graph[name]:
            if state.get(other) == 1:
                cycles.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, [*path, other])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles

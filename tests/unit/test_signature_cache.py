"""The JSON form's signature cache during a content swap on two backends.

Version 1 of m is rewritten in place: its new content (servable m@r9) takes an input named
``z``, its old one (m@r7) an input named ``x``. Backend ``new`` already serves m@r9 while
``old`` still serves m@r7, so routing offers both for version 1. The signature is cached per
servable for the life of the process; keyed by the first candidate's servable (m@r9) but
fetched from whichever backend the forwarder picks, m@r7's signature could be cached under
m@r9's name, and every JSON call would then be converted by the old signature, refused for
the input the new content takes. The fetch (and the call converted with it) go only where the
servable of the key serves, so the cache holds what was fetched.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from google.protobuf import struct_pb2

from gateway.api.inference import Inference
from gateway.edge import Call
from gateway.errors import InvalidArgument
from gateway.forwarding import Forwarder
from gateway.routing import Endpoint, Table, Target
from gateway.transport import MemoryTransport
from modelmux.v1 import inference_pb2
from modelmux_common.tfserving import get_model_metadata_pb2, predict_pb2
from unit.unit_helpers import context, endpoint, predict_reply, table

DT_FLOAT = 1


def _metadata(servable: str, input_name: str) -> bytes:
    signatures = get_model_metadata_pb2.SignatureDefMap()
    info = signatures.signature_def["serving_default"].inputs[input_name]
    info.dtype = DT_FLOAT
    info.tensor_shape.dim.add(size=-1)
    signatures.signature_def["serving_default"].outputs["y"].dtype = DT_FLOAT
    reply = get_model_metadata_pb2.GetModelMetadataResponse()
    reply.model_spec.name = servable
    reply.metadata["signature_def"].Pack(signatures)
    return bytes(reply.SerializeToString())


class Backend:
    """A backend holding servables (name -> the input its signature takes)."""

    def __init__(self, name: str, servables: dict[str, str]) -> None:
        self.servables = servables
        self.endpoint: Endpoint = endpoint(name, self)

    async def __call__(self, method: str, data: bytes) -> bytes:
        if method == "GetModelMetadata":
            spec = get_model_metadata_pb2.GetModelMetadataRequest.FromString(data).model_spec
            return _metadata(spec.name, self.servables[spec.name])
        request = predict_pb2.PredictRequest.FromString(data)
        wanted = self.servables[request.model_spec.name]
        if set(request.inputs) != {wanted}:
            raise InvalidArgument(f"{request.model_spec.name} takes {wanted}")
        return predict_reply(2.0)

    @property
    def metadata_calls(self) -> int:
        transport = self.endpoint.transport
        assert isinstance(transport, MemoryTransport)
        return sum(method == "GetModelMetadata" for method, _ in transport.sent)


@dataclass
class Tables:
    table: Table


def _json(name: str) -> bytes:
    inputs = struct_pb2.Struct()
    inputs.update({name: [1.0, 2.0]})
    return inference_pb2.PredictRequest(model="m", json_inputs=inputs).SerializeToString()


async def _predict(api: Inference, data: bytes) -> inference_pb2.PredictResponse:
    ctx = context()
    return inference_pb2.PredictResponse.FromString(await api.predict(data, ctx, Call(ctx)))


@pytest.mark.parametrize("busy", ["new", "old"])
async def test_a_content_swap_on_two_backends_caches_the_signature_it_fetched(busy: str) -> None:
    new = Backend("new", {"m@r9": "z", "m@r7": "x"})
    old = Backend("old", {"m@r7": "x"})
    # the forwarder prefers the backend with fewer calls in flight: make it pick either one
    (new if busy == "new" else old).endpoint.outstanding = 5
    tables = Tables(table({1: (Target(new.endpoint, "m@r9"), Target(old.endpoint, "m@r7"))}))
    api = Inference(tables, Forwarder(timeout=5.0, backend_max_inflight=10).send)

    during = await _predict(api, _json("z"))  # converted by m@r9's signature, sent to m@r9
    assert during.version == 1 and "y" in during.json_outputs.fields
    assert (new.metadata_calls, old.metadata_calls) == (1, 0)

    # the swap completes: both backends serve m@r9, the old content is gone
    old.servables = {"m@r9": "z"}
    tables.table = table({1: (Target(new.endpoint, "m@r9"), Target(old.endpoint, "m@r9"))})
    for _ in range(4):  # whichever backend the call goes to, the cached signature is m@r9's
        assert "y" in (await _predict(api, _json("z"))).json_outputs.fields
    with pytest.raises(InvalidArgument, match="unknown input 'x'"):
        await _predict(api, _json("x"))
    assert new.metadata_calls + old.metadata_calls == 1  # fetched once


async def test_the_old_content_keeps_its_own_signature_while_it_is_the_first_choice() -> None:
    old = Backend("old", {"m@r7": "x"})
    new = Backend("new", {"m@r9": "z"})
    new.endpoint.outstanding = 5  # the forwarder would rather pick "old"
    tables = Tables(table({1: (Target(old.endpoint, "m@r7"), Target(new.endpoint, "m@r9"))}))
    api = Inference(tables, Forwarder(timeout=5.0, backend_max_inflight=10).send)
    assert "y" in (await _predict(api, _json("x"))).json_outputs.fields
    tables.table = table({1: (Target(new.endpoint, "m@r9"),)})
    new.endpoint.outstanding = 0
    assert "y" in (await _predict(api, _json("z"))).json_outputs.fields  # m@r9's own signature
    assert (old.metadata_calls, new.metadata_calls) == (1, 1)

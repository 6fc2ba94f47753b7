"""The live fuzz's machinery: every method a server reflects, a valid message for any of them,
mutants of a message, and one call of any kind that says what came back."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
UNARY_TIMEOUT = 10.0  # a unary call (or a stream the client ends) past it is a hang
WATCH_TIMEOUT = 2.0  # a server stream may wait for ever (a watch): its first message is enough
# the string every string field of a generated message gets, one per message (known names
# reach past the lookups; the rest are turned away)
NAMES = ("iris", "half_plus_two", "half-plus-two", "fuzz-async", "fuzz-1", "stable", "")


@dataclass(frozen=True)
class Method:
    path: str  # /package.Service/Method
    kind: str  # unary, server (streams its answer), client (streams its request), bidi
    input: descriptor.Descriptor


def reflected_methods(address: str) -> list[Method]:
    """Every method of every service the server's reflection lists, with its request type."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        out = []
        for name in sorted(database.get_services()):
            for m in pool.FindServiceByName(name).methods:
                kind = {
                    (False, False): "unary",
                    (False, True): "server",
                    (True, False): "client",
                    (True, True): "bidi",
                }[(m.client_streaming, m.server_streaming)]
                out.append(Method(f"/{name}/{m.name}", kind, m.input_type))
        return out


def generated(message: descriptor.Descriptor, rng: random.Random) -> bytes:
    """A valid message of type ``message`` with every field set (a oneof: its last member), for a
    method no seed was written for: what the fuzz mutates for a service added later."""
    out = message_factory.GetMessageClass(message)()
    _fill(out, rng.choice(NAMES), depth=0)
    return bytes(out.SerializeToString())


def _fill(msg: Any, name: str, *, depth: int) -> None:
    for field in msg.DESCRIPTOR.fields:
        repeated = field.is_repeated
        if field.message_type is not None:
            if depth >= 3 or (repeated and field.message_type.GetOptions().map_entry):
                continue
            _fill(getattr(msg, field.name).add() if repeated else getattr(msg, field.name),
                  name, depth=depth + 1)  # fmt: skip
            continue
        value = _scalar(field, name)
        if repeated:
            getattr(msg, field.name).append(value)
        else:
            setattr(msg, field.name, value)


def _scalar(field: descriptor.FieldDescriptor, name: str) -> Any:
    kind = field.cpp_type
    if kind == field.CPPTYPE_STRING:
        return name.encode() if field.type == field.TYPE_BYTES else name
    if kind == field.CPPTYPE_BOOL:
        return True
    if kind in (field.CPPTYPE_FLOAT, field.CPPTYPE_DOUBLE):
        return 1.0
    if kind == field.CPPTYPE_ENUM:
        return field.enum_type.values[-1].number
    return 1


def mutants(seed: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    """Random bytes, and ``seed`` with bytes flipped, cut, inserted, repeated or appended."""
    for i in range(count):
        data = bytearray(seed)
        kind = i % 7
        if kind == 0 or not data:
            yield rng.randbytes(rng.randrange(0, 64))
            continue
        at = rng.randrange(len(data))
        if kind == 1:
            data[at] ^= 1 << rng.randrange(8)
        elif kind == 2:
            del data[at:]
        elif kind == 3:
            data[at:at] = rng.randbytes(rng.randrange(1, 6))
        elif kind == 4:
            data = data * rng.randrange(2, 5)
        elif kind == 5:
            data[at] = rng.randrange(256)
            data[rng.randrange(len(data))] = rng.randrange(256)
        else:  # a field of a random number and wire type at the end
            data += bytes([rng.randrange(8, 256), rng.randrange(0, 128)]) + rng.randbytes(4)
        yield bytes(data)


async def one_call(channel: grpc.aio.Channel, method: Method, data: bytes, limit: int) -> str:
    """The status code name of one call (a server stream: of its first message, or of its end),
    or what went wrong: INTERNAL, UNKNOWN, a call that had to end past its deadline, a status
    message longer than ``limit``."""
    path = method.path

    async def requests() -> AsyncIterator[bytes]:
        yield data  # then the client's side ends

    try:
        if method.kind == "unary":
            await channel.unary_unary(path)(data, timeout=UNARY_TIMEOUT)
            return "OK"
        if method.kind == "client":
            await channel.stream_unary(path)(requests(), timeout=UNARY_TIMEOUT)
            return "OK"
        if method.kind == "server":
            call = channel.unary_stream(path)(data, timeout=WATCH_TIMEOUT)
        else:
            call = channel.stream_stream(path)(requests(), timeout=UNARY_TIMEOUT)
        try:
            async for _ in call:
                return "OK"
            return "OK"
        finally:
            call.cancel()
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
        stalled = code == grpc.StatusCode.DEADLINE_EXCEEDED and method.kind != "server"
        if code in FORBIDDEN or stalled or len(details) > limit:
            return f"{code.name}: {path} {data.hex()[:120]}: {details[:200]}"
        return code.name


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")

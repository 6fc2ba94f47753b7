"""Just enough of the protobuf wire format to route a request without decoding its tensors.

TF Serving requests keep the model spec in field 1. :func:`field_bytes` walks the top-level fields,
skipping each by its length, and returns the concatenated payloads of one field (repeated
occurrences of an embedded message merge, so concatenation is what a full parser would see).
Walking every top-level field also rejects framing that a full parser would reject.

A walk in Python costs about 0.4 µs a field, and a hostile 64 MiB request can hold 30 million tiny
fields (12 s of the event loop); so a walk stops after ``limit`` fields and says it did. A normal
request has a handful (model spec, one per input, one per output filter), and serializers write
field 1 first: what the caller does with a partial walk is up to it (see gateway/api/facade.py).
"""

from __future__ import annotations

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 10 bytes")


# How many top-level fields a walk reads at most (~0.1 ms of Python).
MAX_FIELDS = 256


def field_bytes(
    data: bytes, number: int, *, first: bool = False, limit: int = MAX_FIELDS
) -> tuple[bytes, bool]:
    """The payload of length-delimited field ``number`` (b"" when absent), and whether the walk
    read the whole message (False: it stopped after ``limit`` fields, and the payload is what
    those held).

    Repeated occurrences are concatenated (how an embedded message merges), or with ``first`` only
    the first is returned (an element of a repeated field).
    """
    view = memoryview(data)
    end = len(data)
    pos = 0
    found: list[bytes] = []
    for _ in range(limit):
        if pos >= end:
            break
        key, pos = _varint(view, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == _LEN:
            length, pos = _varint(view, pos, end)
            stop = pos + length
            if stop > end:
                raise WireError(f"field {field} runs past the end of the message")
            if field == number and not (first and found):
                found.append(bytes(view[pos:stop]))
            pos = stop
        elif wire_type == _VARINT:
            _, pos = _varint(view, pos, end)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type} in field {field}")
        if pos > end:
            raise WireError(f"field {field} runs past the end of the message")
    payload = found[0] if len(found) == 1 else b"".join(found)
    return payload, pos >= end


def encode_len_field(number: int, payload: bytes) -> bytes:
    """Encodes ``payload`` as length-delimited field ``number``."""
    return _encode_varint((number << 3) | _LEN) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

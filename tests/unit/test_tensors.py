"""Tensors between the caller's forms and TF Serving's (gateway/tensors.py): modelmux.v1's typed
Tensor, JSON values (NaN and ±Infinity as protobuf's JSON mapping writes them), TensorProto."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from google.protobuf import struct_pb2
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.errors import InvalidArgument
from gateway.tensors import (
    in_modelmux_names,
    json_to_proto,
    proto_to_json,
    proto_to_numpy,
    proto_to_typed,
    struct_from,
    struct_values,
    typed_to_proto,
)
from modelmux.v1 import tensor_pb2
from modelmux_common.tfserving import tensor_pb2 as tf_tensor_pb2
from modelmux_common.tfserving import types_pb2

FLOAT_DTYPES = {types_pb2.DT_FLOAT: 32, types_pb2.DT_DOUBLE: 64, types_pb2.DT_HALF: 16}
INT_DTYPES = (types_pb2.DT_INT32, types_pb2.DT_INT64, types_pb2.DT_UINT8, types_pb2.DT_INT8)
JSON_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def as_json(value: float) -> float | str:
    """A float as protobuf's JSON mapping writes it: non-finite ones as strings."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def from_json(value: Any, tf_dtype: int, shape: tuple[int, ...] | None = None) -> Any:
    proto = tf_tensor_pb2.TensorProto()
    json_to_proto("x", value, proto, tf_dtype=tf_dtype, signature_shape=shape)
    return proto


# --- typed (modelmux.v1 Tensor) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "tf", "numpy"),
    [
        (tensor_pb2.DATA_TYPE_FLOAT32, types_pb2.DT_FLOAT, "<f4"),
        (tensor_pb2.DATA_TYPE_FLOAT64, types_pb2.DT_DOUBLE, "<f8"),
        (tensor_pb2.DATA_TYPE_INT64, types_pb2.DT_INT64, "<i8"),
        (tensor_pb2.DATA_TYPE_UINT8, types_pb2.DT_UINT8, "u1"),
        (tensor_pb2.DATA_TYPE_FLOAT16, types_pb2.DT_HALF, "<f2"),
        (tensor_pb2.DATA_TYPE_BOOL, types_pb2.DT_BOOL, "?"),
    ],
)
def test_typed_round_trip_keeps_bytes(ours: int, tf: int, numpy: str) -> None:
    values = np.arange(12).reshape(3, 4).astype(numpy)
    typed = tensor_pb2.Tensor(dtype=ours, shape=[3, 4], content=values.tobytes())  # type: ignore[arg-type]
    proto = tf_tensor_pb2.TensorProto()
    typed_to_proto("x", typed, proto)
    assert proto.dtype == tf and proto.tensor_content == values.tobytes()
    back = tensor_pb2.Tensor()
    proto_to_typed(proto, back)
    assert back == typed
    np.testing.assert_array_equal(proto_to_numpy(proto), values)


def test_typed_strings() -> None:
    ours = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_STRING, shape=[2], string_values=[b"a", b"b"]
    )
    proto = tf_tensor_pb2.TensorProto()
    typed_to_proto("s", ours, proto)
    assert list(proto.string_val) == [b"a", b"b"] and proto_to_json(proto) == ["a", "b"]
    back = tensor_pb2.Tensor()
    proto_to_typed(proto, back)
    assert back == ours


def test_typed_from_value_fields() -> None:
    """A TensorProto without tensor_content (TF's typed value fields) answers as packed bytes."""
    proto = tf_tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, int_val=[1, 2, 3])
    proto.tensor_shape.dim.add().size = 3
    out = tensor_pb2.Tensor()
    proto_to_typed(proto, out)
    assert out.dtype == tensor_pb2.DATA_TYPE_INT32 and list(out.shape) == [3]
    assert np.frombuffer(out.content, "<i4").tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("tensor", "why"),
    [
        (tensor_pb2.Tensor(shape=[1], content=b"\0" * 4), "dtype is not set"),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_STRING, shape=[2], string_values=[b"a"]),
            "needs 2 string_values, got 1",
        ),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3], content=b"\0" * 8),
            "needs 12 content bytes, got 8",
        ),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[-1], content=b""),
            "negative dimension",
        ),
    ],
)
def test_typed_refuses_what_does_not_match(tensor: tensor_pb2.Tensor, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why) as info:
        typed_to_proto("x", tensor, tf_tensor_pb2.TensorProto())
    assert "input 'x'" in info.value.message


# --- JSON -------------------------------------------------------------------------------------


def test_json_uses_signature_dtype_and_shape() -> None:
    proto = from_json([[1, 2], [3, 4]], types_pb2.DT_INT64, (-1, 2))
    assert [d.size for d in proto.tensor_shape.dim] == [2, 2]
    assert proto_to_json(proto) == [[1, 2], [3, 4]]
    assert proto_to_json(from_json(5.5, types_pb2.DT_FLOAT, (-1,))) == [5.5]  # a scalar: rank 1
    assert proto_to_json(from_json(5.5, types_pb2.DT_FLOAT, ())) == 5.5  # stays a scalar


@pytest.mark.parametrize(
    ("value", "dtype", "why"),
    [
        ([1.5], types_pb2.DT_INT32, "expected integers"),
        ([True], types_pb2.DT_STRING, "expected strings"),
        ([[1, 2], [3]], types_pb2.DT_FLOAT, "ragged"),
        ([["a"], "b"], types_pb2.DT_STRING, "ragged"),
        ([1, "x"], types_pb2.DT_FLOAT, "expected numbers"),
        (["a"], types_pb2.DT_INT32, "expected numbers for DT_INT32, got strings"),
        ([1], types_pb2.DT_RESOURCE, "DT_RESOURCE cannot come from JSON"),
    ],
)
def test_json_refuses_values_of_the_wrong_kind(value: Any, dtype: int, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why) as info:
        from_json(value, dtype)
    assert "input 'x'" in info.value.message


def test_json_strings_as_text_or_hex() -> None:
    proto = tf_tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"ok", b"\xff\x00"])
    proto.tensor_shape.dim.add().size = 2
    assert proto_to_json(proto) == ["ok", "ff00"]  # bytes that are not UTF-8 as hex


def test_typed_fields_without_tensor_content() -> None:
    proto = tf_tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[2.0])
    proto.tensor_shape.dim.add().size = 3
    assert proto_to_json(proto) == [2.0, 2.0, 2.0]  # TF repeats the last value
    half = tf_tensor_pb2.TensorProto(
        dtype=types_pb2.DT_HALF, half_val=[np.float16(1.5).view(np.uint16)]
    )
    assert proto_to_json(half) == 1.5


def test_dtype_names_in_the_callers_api() -> None:
    text = "input 'x': expected dtype DT_FLOAT, got DT_INT32 (DT_RESOURCE stays)"
    assert in_modelmux_names(text) == (
        "input 'x': expected dtype DATA_TYPE_FLOAT32, got DATA_TYPE_INT32 (DT_RESOURCE stays)"
    )


# --- NaN and ±Infinity ------------------------------------------------------------------------


@given(dtype=st.sampled_from(sorted(FLOAT_DTYPES)), data=st.data())
def test_non_finite_floats_round_trip_through_json(dtype: int, data: st.DataObject) -> None:
    width = FLOAT_DTYPES[dtype]
    values = data.draw(st.lists(st.floats(width=width), max_size=20))  # type: ignore[arg-type]
    sent = [as_json(v) for v in values]
    back = proto_to_json(from_json(sent, dtype, (-1,)))
    assert back == sent or (not values and back == [])
    # what the gateway answers: a Struct, which serializes and reads back the same
    reply = struct_pb2.Struct.FromString(struct_from({"y": back}).SerializeToString())
    assert struct_values(reply) == {"y": sent}


@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=10),
    as_strings=st.booleans(),
)
def test_a_binary_struct_with_nan_numbers_converts(values: list[float], as_strings: bool) -> None:
    """A binary caller can put NaN into a Struct's number_value; json_format.MessageToDict (the
    old conversion) raised ValueError there, which was INTERNAL."""
    struct = struct_from({"x": [as_json(v) for v in values] if as_strings else values})
    proto = from_json(struct_values(struct)["x"], types_pb2.DT_DOUBLE, (-1,))
    np.testing.assert_array_equal(np.frombuffer(proto.tensor_content, "<f8"), values)


@given(
    dtype=st.sampled_from(INT_DTYPES),
    value=st.one_of(st.sampled_from(sorted(JSON_NAMES)), st.sampled_from([math.nan, math.inf])),
    name=st.text(min_size=1, max_size=300),
)
def test_non_finite_for_an_integer_input_is_invalid_argument_naming_it(
    dtype: int, value: float | str, name: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        json_to_proto(
            name, [1, value], tf_tensor_pb2.TensorProto(), tf_dtype=dtype, signature_shape=None
        )
    assert f"input {name!r}" in info.value.message


@given(text=st.text(min_size=1).filter(lambda t: t not in JSON_NAMES))
def test_other_strings_for_a_float_input_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="expected numbers"):
        from_json([1.0, text], types_pb2.DT_FLOAT, (-1,))


# --- any tensor, any JSON ---------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.sampled_from(sorted(JSON_NAMES)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=16,
)
TF_DTYPES = st.sampled_from(sorted(types_pb2.DataType.values())) | st.integers(-3, 40)


@given(value=JSON_VALUES, dtype=TF_DTYPES, shape=st.none() | st.lists(st.integers(-1, 3)))
@example(value=[1e300], dtype=types_pb2.DT_INT8, shape=None)  # wrapped silently to garbage
@example(value=[2**63], dtype=types_pb2.DT_INT32, shape=None)
@example(value=[-1], dtype=types_pb2.DT_UINT8, shape=None)
@example(value=[1e300], dtype=types_pb2.DT_FLOAT, shape=None)  # +Infinity, as IEEE rounds it
def test_any_json_value_converts_or_is_invalid_argument(
    value: Any, dtype: int, shape: list[int] | None
) -> None:
    """What a caller's json_inputs (through a Struct) become; warnings are errors here, so a cast
    that overflows is caught too."""
    value = struct_values(struct_from({"x": value}))["x"]  # as the gateway receives it
    proto = tf_tensor_pb2.TensorProto()
    try:
        json_to_proto("x", value, proto, tf_dtype=dtype, signature_shape=shape)
    except InvalidArgument as exc:
        assert exc.message.startswith("input 'x': ")
        return
    back = proto_to_numpy(proto)  # the tensor is whole: its bytes match its shape
    assert list(back.shape) == [d.size for d in proto.tensor_shape.dim]
    if back.dtype.kind in "iu":
        assert np.array_equal(back, np.asarray(value).astype(back.dtype))  # nothing wrapped


@given(
    dtype=st.sampled_from(sorted(tensor_pb2.DataType.values())) | st.integers(-3, 40),
    shape=st.lists(st.integers(-2, 4) | st.integers(2**40, 2**62), max_size=4),
    content=st.binary(max_size=64),
    strings=st.lists(st.binary(max_size=4), max_size=6),
)
def test_any_typed_tensor_converts_or_is_invalid_argument(
    dtype: int, shape: list[int], content: bytes, strings: list[bytes]
) -> None:
    typed = tensor_pb2.Tensor(dtype=dtype, shape=shape, content=content, string_values=strings)  # type: ignore[arg-type]
    proto = tf_tensor_pb2.TensorProto()
    try:
        typed_to_proto("x", typed, proto)
    except InvalidArgument as exc:
        assert exc.message.startswith("input 'x': ")
        return
    assert [d.size for d in proto.tensor_shape.dim] == shape
    assert proto.tensor_content == content or list(proto.string_val) == strings
    if max(shape, default=0) < 2**20:  # what a backend's reply can hold: back the same
        back = tensor_pb2.Tensor()
        proto_to_typed(proto, back)
        assert back.dtype == typed.dtype and list(back.shape) == shape
        if typed.dtype == tensor_pb2.DATA_TYPE_STRING:  # (the other field is left behind)
            assert back.string_values == typed.string_values
        else:
            assert back.content == typed.content

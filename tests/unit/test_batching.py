"""Server-side batching's pure pieces (gateway/batching.py): which requests can be batched and
with how many rows, joining inputs along the batch dimension and cutting outputs back."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from gateway.batching import concat, rows_of, split
from gateway.tensors import proto_to_numpy
from modelmux_common.tfserving import predict_pb2, types_pb2
from modelmux_common.tfserving import tensor_pb2 as tf_tensor_pb2

TensorProto = tf_tensor_pb2.TensorProto


def floats(values: list[float], *dims: int) -> Any:
    tensor = TensorProto(dtype=types_pb2.DT_FLOAT)
    for size in dims or (len(values),):
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = np.asarray(values, dtype="<f4").tobytes()
    return tensor


def request(inputs: dict[str, list[float]]) -> Any:
    out = predict_pb2.PredictRequest()
    out.model_spec.name = "m"
    for name, values in inputs.items():
        out.inputs[name].CopyFrom(floats(values))
    return out


def values(tensor: Any) -> list[Any]:
    return list(proto_to_numpy(tensor).tolist())


def dims(tensor: Any) -> list[int]:
    return [d.size for d in tensor.tensor_shape.dim]


def test_rows_of() -> None:
    assert rows_of(request({"a": [1.0, 2.0], "b": [3.0, 4.0]})) == 2
    assert rows_of(request({"a": [1.0], "b": [3.0, 4.0]})) is None  # disagree
    assert rows_of(request({})) is None
    scalar = request({})
    scalar.inputs["a"].CopyFrom(TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0]))
    assert rows_of(scalar) is None
    short = request({"a": [1.0, 2.0]})
    short.inputs["a"].tensor_content = short.inputs["a"].tensor_content[:4]
    assert rows_of(short) is None  # values do not match the shape
    odd = request({"a": [1.0]})
    odd.inputs["a"].tensor_content += b"\0"
    assert rows_of(odd) is None  # not a whole number of values
    listed = request({})
    listed.inputs["a"].CopyFrom(TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0]))
    listed.inputs["a"].tensor_shape.dim.add(size=2)
    assert rows_of(listed) == 2
    del listed.inputs["a"].float_val[1:]
    assert rows_of(listed) is None  # TF would repeat the last value; a batch must not
    tagged = request({"a": [1.0]})
    tagged.client_id = b"me"
    assert rows_of(tagged) is None  # fields the batch would lose


def test_rows_of_refuses_empty_negative_and_unknown() -> None:
    empty = request({})
    empty.inputs["a"].CopyFrom(floats([], 0))
    assert rows_of(empty) is None  # no rows
    negative = request({})
    negative.inputs["a"].CopyFrom(floats([1.0], 1, -1))
    assert rows_of(negative) is None
    resource = request({})
    resource.inputs["a"].CopyFrom(TensorProto(dtype=types_pb2.DT_RESOURCE))
    resource.inputs["a"].tensor_shape.dim.add(size=1)
    assert rows_of(resource) is None  # a dtype batching does not count
    words = request({})
    words.inputs["s"].CopyFrom(TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"a", b"b"]))
    words.inputs["s"].tensor_shape.dim.add(size=2)
    assert rows_of(words) == 2


def test_concat_and_split_every_encoding() -> None:
    content = floats([1.0, 2.0])
    listed = TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[3.0])
    listed.tensor_shape.dim.add(size=1)
    joined = TensorProto()
    concat([content, listed], joined)
    assert dims(joined) == [3] and values(joined) == [1.0, 2.0, 3.0]
    parts = split(joined, [2, 1])
    assert parts is not None and [values(p) for p in parts] == [[1.0, 2.0], [3.0]]

    words = []
    for batch in ([b"a", b"b"], [b"c"]):
        t = TensorProto(dtype=types_pb2.DT_STRING, string_val=batch)  # [n, 1]
        t.tensor_shape.dim.add(size=len(batch))
        t.tensor_shape.dim.add(size=1)
        words.append(t)
    joined = TensorProto()
    concat(words, joined)
    assert list(joined.string_val) == [b"a", b"b", b"c"]
    parts = split(joined, [1, 2])
    assert parts is not None
    assert [list(p.string_val) for p in parts] == [[b"a"], [b"b", b"c"]]
    assert [dims(p) for p in parts] == [[1, 1], [2, 1]]
    assert split(joined, [1, 1]) is None  # 3 rows are not a batch of 2

    # a dtype the gateway does not decode (DT_BFLOAT16) is cut by bytes
    raw = TensorProto(dtype=types_pb2.DT_BFLOAT16, tensor_content=bytes(range(12)))
    raw.tensor_shape.dim.add(size=3)
    raw.tensor_shape.dim.add(size=2)
    parts = split(raw, [1, 2])
    assert parts is not None
    assert [p.tensor_content for p in parts] == [bytes(range(4)), bytes(range(4, 12))]
    assert [dims(p) for p in parts] == [[1, 2], [2, 2]]


def test_split_of_value_fields_and_what_cannot_be_cut() -> None:
    listed = TensorProto(dtype=types_pb2.DT_INT64, int64_val=[1, 2, 3, 4, 5, 6])
    for size in (3, 2):
        listed.tensor_shape.dim.add(size=size)
    parts = split(listed, [2, 1])
    assert parts is not None and [values(p) for p in parts] == [[[1, 2], [3, 4]], [[5, 6]]]
    repeated = TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])  # TF's "repeat the last"
    repeated.tensor_shape.dim.add(size=2)
    assert split(repeated, [1, 1]) is None
    assert split(TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0]), [1]) is None  # scalar
    ragged = floats([1.0, 2.0, 3.0])
    ragged.tensor_content += b"\0\0"
    assert split(ragged, [1, 2]) is None  # bytes not divisible by the rows
    strings = TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"a"])
    strings.tensor_shape.dim.add(size=2)
    assert split(strings, [1, 1]) is None


@given(
    counts=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    packed=st.booleans(),
    data=st.data(),
)
def test_concat_then_split_gives_each_call_its_rows(
    counts: list[int], packed: bool, data: st.DataObject
) -> None:
    """Calls of [n, 3] float tensors (packed or as value fields), joined and cut by their row
    counts, come back as they were sent."""
    calls = []
    for n in counts:
        flat = data.draw(st.lists(st.floats(width=32), min_size=3 * n, max_size=3 * n))
        tensor = floats(flat, n, 3)
        if not packed:
            tensor = TensorProto(dtype=types_pb2.DT_FLOAT, float_val=flat)
            for size in (n, 3):
                tensor.tensor_shape.dim.add(size=size)
        calls.append(tensor)
    joined = TensorProto()
    concat(calls, joined)
    assert dims(joined) == [sum(counts), 3]
    parts = split(joined, counts)
    assert parts is not None
    for part, call in zip(parts, calls, strict=True):
        np.testing.assert_array_equal(proto_to_numpy(part), proto_to_numpy(call))
        assert dims(part) == dims(call)

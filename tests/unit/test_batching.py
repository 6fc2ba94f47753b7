"""Server-side batching's pure pieces (gateway/batching.py): which requests can be batched and
with how many rows, joining inputs along the batch dimension and cutting outputs back."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.batching import concat, rows_of, split
from gateway.tensors import VAL_FIELD, proto_to_numpy
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


BATCH_DTYPES = [
    types_pb2.DT_FLOAT, types_pb2.DT_INT8, types_pb2.DT_UINT8, types_pb2.DT_INT32,
    types_pb2.DT_HALF, types_pb2.DT_BOOL, types_pb2.DT_STRING, types_pb2.DT_INT64,
    types_pb2.DT_UINT32, types_pb2.DT_COMPLEX64,
]  # fmt: skip


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    """A TensorProto as a caller may send it: any of these dtypes, a small shape, values packed
    or in the dtype's value field, of any count and range."""
    dtype = draw(st.sampled_from(BATCH_DTYPES))
    tensor = TensorProto(dtype=dtype)
    for size in draw(st.lists(st.integers(-1, 3), min_size=0, max_size=3)):
        tensor.tensor_shape.dim.add(size=size)
    if dtype == types_pb2.DT_STRING:
        tensor.string_val.extend(draw(st.lists(st.binary(max_size=3), max_size=8)))
    elif draw(st.booleans()):
        tensor.tensor_content = draw(st.binary(max_size=40))
    elif dtype in VAL_FIELD:
        field = getattr(tensor, VAL_FIELD[dtype])
        if dtype in (types_pb2.DT_FLOAT,):
            field.extend(draw(st.lists(st.floats(width=32), max_size=8)))
        elif dtype == types_pb2.DT_BOOL:
            field.extend(draw(st.lists(st.booleans(), max_size=8)))
        else:
            bits = 64 if dtype == types_pb2.DT_INT64 else 32
            low = 0 if dtype == types_pb2.DT_UINT32 else -(2 ** (bits - 1))
            high = 2**32 - 1 if dtype == types_pb2.DT_UINT32 else 2 ** (bits - 1) - 1
            field.extend(draw(st.lists(st.integers(low, high), max_size=8)))
    return tensor


@given(inputs=st.lists(tensors(), min_size=1, max_size=4))
@example(
    inputs=[
        TensorProto(dtype=types_pb2.DT_INT8, int_val=[1000], tensor_shape={"dim": [{"size": 1}]})
    ]
    * 2
)
def test_any_requests_batch_or_are_sent_alone(inputs: list[Any]) -> None:
    """Requests batching accepts (rows_of) are joined whatever their tensors hold; the others
    go alone. TF Serving casts an int_val past the dtype's range (it wraps): so does a batch."""
    accepted = []
    for tensor in inputs:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "m"
        req.inputs["x"].CopyFrom(tensor)
        if rows_of(req) is not None:
            accepted.append(tensor)
    same = [
        t for t in accepted if (t.dtype, dims(t)[1:]) == (accepted[0].dtype, dims(accepted[0])[1:])
    ]
    if not same:
        return
    joined = TensorProto()
    concat(same, joined)
    assert dims(joined)[0] == sum(dims(t)[0] for t in same)
    if joined.dtype != types_pb2.DT_STRING:
        assert proto_to_numpy(joined).size == sum(proto_to_numpy(t).size for t in same)

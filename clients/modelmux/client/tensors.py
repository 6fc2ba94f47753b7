"""numpy arrays <-> ``modelmux.v1.Tensor``, with no work per element for numeric dtypes.

A numeric array goes out as its bytes (little-endian, row-major: one ``tobytes``) and comes back
as a read-only view over the response's bytes (``np.frombuffer``); only strings travel element by
element, in ``string_values``, because that is how the wire carries them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from modelmux.v1 import tensor_pb2

D = tensor_pb2.DataType

# Wire dtype <-> numpy dtype (little-endian); STRING is handled apart.
NUMPY_OF: dict[tensor_pb2.DataType.ValueType, np.dtype[Any]] = {
    D.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    D.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    D.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    D.DATA_TYPE_INT8: np.dtype("i1"),
    D.DATA_TYPE_INT16: np.dtype("<i2"),
    D.DATA_TYPE_INT32: np.dtype("<i4"),
    D.DATA_TYPE_INT64: np.dtype("<i8"),
    D.DATA_TYPE_UINT8: np.dtype("u1"),
    D.DATA_TYPE_UINT16: np.dtype("<u2"),
    D.DATA_TYPE_UINT32: np.dtype("<u4"),
    D.DATA_TYPE_UINT64: np.dtype("<u8"),
    D.DATA_TYPE_BOOL: np.dtype("?"),
}
# (kind, itemsize) of a numpy dtype -> wire dtype; byte order is normalised before the lookup.
_WIRE_OF: dict[tuple[str, int], tensor_pb2.DataType.ValueType] = {
    (n.kind, n.itemsize): w for w, n in NUMPY_OF.items()
}
_STRING_KINDS = frozenset("USO")


def to_tensor(name: str, value: npt.ArrayLike) -> tensor_pb2.Tensor:
    """An array (or anything ``np.asarray`` takes) as a Tensor.

    Numeric and bool arrays keep their dtype: the model's signature decides whether it fits (a
    float64 array for a float32 input gets INVALID_ARGUMENT naming both). ``str`` elements are
    sent as UTF-8, ``bytes`` elements as they are; an object array may hold either.
    """
    array = np.asarray(value)
    shape = array.shape
    if array.dtype.kind in _STRING_KINDS:
        return tensor_pb2.Tensor(
            dtype=D.DATA_TYPE_STRING, shape=shape, string_values=_strings(name, array)
        )
    wire = _WIRE_OF.get((array.dtype.kind, array.dtype.itemsize))
    if wire is None:
        raise TypeError(f"input {name!r}: dtype {array.dtype} has no modelmux.v1 DataType")
    packed = np.ascontiguousarray(array, dtype=NUMPY_OF[wire])  # a copy only when needed
    return tensor_pb2.Tensor(dtype=wire, shape=shape, content=packed.tobytes())


def _strings(name: str, array: np.ndarray[Any, Any]) -> list[bytes]:
    flat = array.reshape(-1).tolist()
    if array.dtype.kind == "S":
        return flat  # numpy drops trailing NUL bytes of "S" items: use an object array for those
    out: list[bytes] = []
    for item in flat:
        if isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, bytes):
            out.append(item)
        else:
            raise TypeError(
                f"input {name!r}: a string tensor holds str or bytes, not {type(item).__name__}"
            )
    return out


def from_tensor(name: str, tensor: tensor_pb2.Tensor) -> np.ndarray[Any, Any]:
    """A Tensor as a numpy array: a read-only view over the message's bytes for numeric dtypes
    (``.copy()`` it to write), an object array of ``bytes`` for strings."""
    shape = tuple(tensor.shape)
    count = math.prod(shape)
    if tensor.dtype == D.DATA_TYPE_STRING:
        if len(tensor.string_values) != count:
            raise ValueError(
                f"output {name!r}: shape {list(shape)} needs {count} string values, "
                f"got {len(tensor.string_values)}"
            )
        strings = np.empty(count, dtype=object)
        strings[:] = list(tensor.string_values)
        return strings.reshape(shape)
    dtype = NUMPY_OF.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"output {name!r}: unknown DataType {tensor.dtype}")
    if len(tensor.content) != count * dtype.itemsize:
        raise ValueError(
            f"output {name!r}: shape {list(shape)} of {dtype.name} needs "
            f"{count * dtype.itemsize} content bytes, got {len(tensor.content)}"
        )
    return np.frombuffer(tensor.content, dtype=dtype).reshape(shape)

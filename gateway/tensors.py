"""Tensor conversions without TensorFlow: modelmux Tensor / JSON <-> TF TensorProto.

Numeric tensors travel as packed little-endian bytes in both messages, so converting a typed
tensor is a copy of the bytes field and never touches individual elements.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import struct_pb2

from gateway.errors import InvalidArgument, shown
from modelmux.v1 import tensor_pb2
from modelmux_common.tfserving import types_pb2

TensorProto = Any  # tensorflow.TensorProto (generated class without stubs)

DT = types_pb2.DataType
D = tensor_pb2.DataType

# modelmux dtype -> (TF dtype, numpy dtype); STRING has no numpy packing.
_OURS: dict[int, tuple[int, np.dtype[Any] | None]] = {
    D.DATA_TYPE_FLOAT32: (DT.DT_FLOAT, np.dtype("<f4")),
    D.DATA_TYPE_FLOAT64: (DT.DT_DOUBLE, np.dtype("<f8")),
    D.DATA_TYPE_INT32: (DT.DT_INT32, np.dtype("<i4")),
    D.DATA_TYPE_INT64: (DT.DT_INT64, np.dtype("<i8")),
    D.DATA_TYPE_UINT8: (DT.DT_UINT8, np.dtype("u1")),
    D.DATA_TYPE_INT8: (DT.DT_INT8, np.dtype("i1")),
    D.DATA_TYPE_INT16: (DT.DT_INT16, np.dtype("<i2")),
    D.DATA_TYPE_UINT16: (DT.DT_UINT16, np.dtype("<u2")),
    D.DATA_TYPE_UINT32: (DT.DT_UINT32, np.dtype("<u4")),
    D.DATA_TYPE_UINT64: (DT.DT_UINT64, np.dtype("<u8")),
    D.DATA_TYPE_FLOAT16: (DT.DT_HALF, np.dtype("<f2")),
    D.DATA_TYPE_BOOL: (DT.DT_BOOL, np.dtype("?")),
    D.DATA_TYPE_STRING: (DT.DT_STRING, None),
}
_FROM_TF: dict[int, int] = {tf: ours for ours, (tf, _) in _OURS.items()}
NUMPY_OF_TF: dict[int, np.dtype[Any]] = {
    tf: npd for _, (tf, npd) in _OURS.items() if npd is not None
}

# TensorProto's typed repeated fields, for tensors sent without tensor_content.
VAL_FIELD: dict[int, str] = {
    DT.DT_FLOAT: "float_val",
    DT.DT_DOUBLE: "double_val",
    DT.DT_INT32: "int_val",
    DT.DT_INT16: "int_val",
    DT.DT_INT8: "int_val",
    DT.DT_UINT8: "int_val",
    DT.DT_UINT16: "int_val",
    DT.DT_INT64: "int64_val",
    DT.DT_UINT32: "uint32_val",
    DT.DT_UINT64: "uint64_val",
    DT.DT_BOOL: "bool_val",
    DT.DT_HALF: "half_val",
}


def tf_dtype_name(dtype: int) -> str:
    try:
        name: str = DT.Name(dtype)
        return name
    except ValueError:
        return f"dtype {dtype}"


_TF_NAME = re.compile(r"\bDT_[A-Z0-9_]+\b")
_OUR_NAME = {tf_dtype_name(tf): D.Name(D.ValueType(ours)) for ours, (tf, _) in _OURS.items()}


def in_modelmux_names(text: str) -> str:
    """``text`` (an error message) with TensorFlow's dtype names as modelmux.v1 names them
    (DT_INT32 -> DATA_TYPE_INT32), for callers of the modelmux.v1 API."""
    return _TF_NAME.sub(lambda match: _OUR_NAME.get(match.group(), match.group()), text)


# Non-finite numbers as JSON carries them: the strings protobuf's JSON mapping uses for floats.
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _set_shape(proto: TensorProto, shape: Sequence[int]) -> None:
    dims = proto.tensor_shape.dim
    for size in shape:
        dims.add().size = size


def typed_to_proto(name: str, tensor: tensor_pb2.Tensor, proto: TensorProto) -> None:
    """Our Tensor -> ``proto`` (a TensorProto), checking dtype and that content matches shape."""
    entry = _OURS.get(tensor.dtype)
    if entry is None:
        raise InvalidArgument(f"input {shown(name)}: dtype is not set or unknown ({tensor.dtype})")
    tf_dtype, np_dtype = entry
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {shown(name)}: shape {shape} has a negative dimension")
    count = math.prod(shape)
    proto.dtype = tf_dtype
    _set_shape(proto, shape)
    if np_dtype is None:
        if len(tensor.string_values) != count:
            raise InvalidArgument(
                f"input {shown(name)}: shape {shape} needs {count} string_values, got {len(tensor.string_values)}"
            )
        proto.string_val.extend(tensor.string_values)
        return
    expected = count * np_dtype.itemsize
    if len(tensor.content) != expected:
        raise InvalidArgument(
            f"input {shown(name)}: shape {shape} of {D.Name(tensor.dtype)} needs {expected} content bytes, "
            f"got {len(tensor.content)}"
        )
    proto.tensor_content = tensor.content


def proto_to_numpy(proto: TensorProto) -> np.ndarray[Any, Any]:
    """TensorProto -> numpy array (object array of bytes for strings)."""
    shape = [d.size for d in proto.tensor_shape.dim]
    count = math.prod(shape)
    if proto.dtype == DT.DT_STRING:
        values = list(proto.string_val)
        return _fill(np.array(values, dtype=object), count).reshape(shape)
    np_dtype = NUMPY_OF_TF.get(proto.dtype)
    if np_dtype is None:
        raise InvalidArgument(f"unsupported tensor dtype {tf_dtype_name(proto.dtype)}")
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=np_dtype).reshape(shape)
    field = VAL_FIELD[proto.dtype]
    raw = getattr(proto, field)
    if proto.dtype == DT.DT_HALF:
        array = np.array(raw, dtype=np.uint16).view(np.float16)
    else:
        array = np.array(raw, dtype=np_dtype)
    return _fill(array, count).reshape(shape)


def _fill(array: np.ndarray[Any, Any], count: int) -> np.ndarray[Any, Any]:
    """TF repeats the last value when a typed field is shorter than the tensor (or zero-fills)."""
    if array.size == count:
        return array
    if array.size == 0:
        return np.zeros(count, dtype=array.dtype)
    if array.size < count:
        return np.concatenate([array, np.full(count - array.size, array[-1], dtype=array.dtype)])
    raise InvalidArgument(f"tensor has {array.size} values for {count} elements")


def proto_to_typed(proto: TensorProto, out: tensor_pb2.Tensor) -> None:
    """TensorProto -> ``out``, our Tensor, filled in place (packed content is copied once)."""
    ours = _FROM_TF.get(proto.dtype)
    if ours is None:
        raise InvalidArgument(f"output dtype {tf_dtype_name(proto.dtype)} has no modelmux dtype")
    out.dtype = ours  # type: ignore[assignment]
    out.shape.extend(d.size for d in proto.tensor_shape.dim)
    if proto.dtype == DT.DT_STRING:
        out.string_values.extend(proto_to_numpy(proto).reshape(-1).tolist())
    elif proto.tensor_content:
        out.content = proto.tensor_content
    else:
        out.content = np.ascontiguousarray(proto_to_numpy(proto)).tobytes()


def json_to_proto(
    name: str,
    value: Any,
    proto: TensorProto,
    *,
    tf_dtype: int,
    signature_shape: Sequence[int] | None,
) -> None:
    """A JSON scalar or nested list -> TensorProto of the signature's dtype.

    A scalar sent for an input the signature declares with rank 1 becomes a one-element vector.
    """
    if (
        signature_shape is not None
        and len(signature_shape) == 1
        and not isinstance(value, list | tuple)
        and np.ndim(value) == 0
    ):
        value = [value]
    proto.dtype = tf_dtype
    if tf_dtype == DT.DT_STRING:
        array = np.array(value, dtype=object)
        _check_rectangular(name, array, value)
        _set_shape(proto, array.shape)
        try:
            proto.string_val.extend(_utf8(v) for v in array.reshape(-1))
        except TypeError:
            raise InvalidArgument(f"input {shown(name)}: expected strings for DT_STRING") from None
        return
    np_dtype = NUMPY_OF_TF.get(tf_dtype)
    if np_dtype is None:
        raise InvalidArgument(
            f"input {shown(name)}: dtype {tf_dtype_name(tf_dtype)} cannot come from JSON"
        )
    try:
        raw = np.array(value)
        if raw.dtype.kind in "UO" and np_dtype.kind == "f":  # "NaN", "Infinity", "-Infinity"
            raw = np.array(_non_finite(value))
    except ValueError:
        raise InvalidArgument(
            f"input {shown(name)}: nested lists are ragged (not a tensor)"
        ) from None
    except KeyError as exc:
        raise InvalidArgument(
            f"input {shown(name)}: expected numbers for {tf_dtype_name(tf_dtype)}, got strings "
            f'({shown(exc.args[0])} is none of "NaN", "Infinity", "-Infinity")'
        ) from None
    _check_rectangular(name, raw, value)
    if raw.size and raw.dtype.kind not in "biuf":
        raise InvalidArgument(
            f"input {shown(name)}: expected numbers for {tf_dtype_name(tf_dtype)}, got {_json_kind(raw)}"
        )
    if (
        np_dtype.kind in "iu"
        and raw.dtype.kind == "f"
        and raw.size
        and not (np.isfinite(raw).all() and np.all(np.mod(raw, 1) == 0))
    ):
        raise InvalidArgument(
            f"input {shown(name)}: expected integers for {tf_dtype_name(tf_dtype)}"
        )
    if np_dtype.kind in "iu" and raw.size:
        limits = np.iinfo(np_dtype)
        if raw.min() < limits.min or raw.max() > limits.max:  # a cast would wrap them
            raise InvalidArgument(
                f"input {shown(name)}: values out of range for {tf_dtype_name(tf_dtype)} "
                f"({limits.min} to {limits.max})"
            )
    try:
        with np.errstate(over="ignore"):  # a float past the dtype's range becomes ±Infinity
            array = raw.astype(np_dtype, casting="unsafe")
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"input {shown(name)}: {exc}") from None
    _set_shape(proto, array.shape)
    proto.tensor_content = array.tobytes()


def _non_finite(value: Any) -> Any:
    """Nested lists with "NaN", "Infinity" and "-Infinity" as floats (KeyError for another
    string)."""
    if isinstance(value, str):
        return _NON_FINITE[value]
    if isinstance(value, list | tuple):
        return [_non_finite(v) for v in value]
    return value


def _utf8(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise TypeError(value)
    return value.encode()


def _json_kind(array: np.ndarray[Any, Any]) -> str:
    kinds = {"U": "strings", "O": "mixed values", "S": "bytes"}
    return kinds.get(array.dtype.kind, str(array.dtype.name))


def _check_rectangular(name: str, array: np.ndarray[Any, Any], value: Any) -> None:
    if (
        array.dtype == object
        and isinstance(value, list)
        and any(isinstance(v, list) for v in value)
    ):
        raise InvalidArgument(f"input {shown(name)}: nested lists are ragged (not a tensor)")


def proto_to_json(proto: TensorProto) -> Any:
    """TensorProto -> JSON value: nested lists, shape preserved; bytes as UTF-8 text when possible;
    NaN and ±Infinity as the strings "NaN", "Infinity", "-Infinity" (a JSON number cannot be)."""
    array = proto_to_numpy(proto)
    if array.dtype == object:
        return _decode_strings(array.tolist())
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        out = array.astype(object)
        out[np.isnan(array)] = "NaN"
        out[array == np.inf] = "Infinity"
        out[array == -np.inf] = "-Infinity"
        return out.tolist()
    return array.tolist()


def struct_values(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as Python values, NaN and ±Infinity included (a binary caller can send those as
    numbers; json_format.MessageToDict refuses them)."""
    return {name: from_value(v) for name, v in struct.fields.items()}


def from_value(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as the Python value ``json.loads`` would give (whole numbers as int)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) <= 2**53 else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_values(value.struct_value)
    if kind == "list_value":
        return [from_value(v) for v in value.list_value.values]
    return None


def _decode_strings(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_strings(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value.hex()
    return value


def struct_from(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out

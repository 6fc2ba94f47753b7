"""TensorProto <-> numpy for Predict, with the input checks TF Serving clients rely on.

Every check runs before TensorFlow does, so a bad request gets INVALID_ARGUMENT naming the input,
what the signature expects and what arrived.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from backend.errors import InvalidArgument
from backend.tfserving import meta_graph_pb2, tensor_pb2, tensor_shape_pb2, types_pb2


def dtype_name(dtype: int) -> str:
    try:
        return str(types_pb2.DataType.Name(dtype))
    except ValueError:
        return f"DataType({dtype})"


def shape_text(shape: tensor_shape_pb2.TensorShapeProto) -> str:
    """``[-1]``, ``[2,2]``, ``[]`` (a scalar) or ``unknown rank``."""
    if shape.unknown_rank:
        return "unknown rank"
    return "[" + ",".join(str(d.size) for d in shape.dim) + "]"


def shape_compatible(
    expected: tensor_shape_pb2.TensorShapeProto, got: tensor_shape_pb2.TensorShapeProto
) -> bool:
    if expected.unknown_rank:
        return True
    if len(expected.dim) != len(got.dim):
        return False
    return all(e.size in (-1, g.size) for e, g in zip(expected.dim, got.dim, strict=True))


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def decode_inputs(
    signature: str,
    sigdef: meta_graph_pb2.SignatureDef,
    inputs: Mapping[str, tensor_pb2.TensorProto],
) -> dict[str, np.ndarray]:
    """Checks names, dtypes and shapes against the signature, then converts to numpy."""
    expected = sigdef.inputs
    for name in sorted(inputs):
        if name not in expected:
            raise InvalidArgument(
                f"input {name!r} is not an input of signature {signature!r}; "
                f"expected inputs: {_names(expected)}"
            )
    for name in sorted(expected):
        if name not in inputs:
            raise InvalidArgument(
                f"input {name!r} is missing; signature {signature!r} expects: {_names(expected)}"
            )
    return {name: decode_input(name, expected[name], inputs[name]) for name in sorted(inputs)}


def decode_input(
    name: str, info: meta_graph_pb2.TensorInfo, proto: tensor_pb2.TensorProto
) -> np.ndarray:
    if proto.dtype != info.dtype:
        raise InvalidArgument(
            f"input {name!r}: expected dtype {dtype_name(info.dtype)}, got {dtype_name(proto.dtype)}"
        )
    shape = proto.tensor_shape
    if shape.unknown_rank or any(d.size < 0 for d in shape.dim):
        raise InvalidArgument(f"input {name!r}: a request tensor needs a fully known shape")
    if not shape_compatible(info.tensor_shape, shape):
        raise InvalidArgument(
            f"input {name!r}: expected shape {shape_text(info.tensor_shape)}, "
            f"got {shape_text(shape)}"
        )
    elements = int(np.prod([d.size for d in shape.dim], dtype=np.int64))
    # Every encoded element takes at least one byte; more elements than bytes would make
    # TensorFlow repeat the last value to fill the shape, which is an easy way to exhaust memory.
    if elements > max(1, proto.ByteSize()):
        raise InvalidArgument(
            f"input {name!r}: shape {shape_text(shape)} declares {elements} elements, "
            f"but the tensor carries only {proto.ByteSize()} bytes"
        )
    try:
        array: np.ndarray = tf.make_ndarray(proto)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"input {name!r}: cannot decode the tensor: {exc}") from exc
    return array


def select_outputs(
    signature: str, sigdef: meta_graph_pb2.SignatureDef, output_filter: Sequence[str]
) -> list[str]:
    """The outputs to compute: all of them, or the ``output_filter`` (each must exist, once)."""
    if not output_filter:
        return sorted(sigdef.outputs)
    seen: set[str] = set()
    for name in output_filter:
        if name not in sigdef.outputs:
            raise InvalidArgument(
                f"output_filter {name!r} is not an output of signature {signature!r}; "
                f"outputs: {_names(sigdef.outputs)}"
            )
        if name in seen:
            raise InvalidArgument(f"output_filter names {name!r} twice")
        seen.add(name)
    return list(output_filter)


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> dict[str, tensor_pb2.TensorProto]:
    return {name: tf.make_tensor_proto(value) for name, value in outputs.items()}

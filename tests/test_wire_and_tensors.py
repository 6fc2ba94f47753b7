"""Unit tests of the byte-level pieces of the request path (no servers needed)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gateway.api.facade import model_spec_of
from gateway.catalog import single_servable
from gateway.errors import InvalidArgument
from gateway.tensors import (
    json_to_proto,
    proto_to_json,
    proto_to_numpy,
    proto_to_typed,
    typed_to_proto,
)
from gateway.wire import WireError, encode_len_field, field_bytes
from modelmux.v1 import tensor_pb2
from modelmux_common.config import BackendConfig
from modelmux_common.tfserving import inference_pb2, model_pb2, predict_pb2, types_pb2
from modelmux_common.tfserving import tensor_pb2 as tf_tensor_pb2


def predict_bytes(name: str = "m", version: int | None = None) -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].tensor_content = np.arange(1000, dtype="<f4").tobytes()
    request.output_filter.append("y")
    return bytes(request.SerializeToString())


def test_model_spec_found_without_decoding_tensors() -> None:
    for data in (predict_bytes("half_plus_two", 3), predict_bytes("half_plus_two", 3) * 20):
        spec, partial = model_spec_of("Predict", data)  # parsed whole, walked
        assert spec.name == "half_plus_two" and spec.version.value == 3 and not partial


def test_multi_inference_uses_first_task() -> None:
    request = inference_pb2.MultiInferenceRequest()
    for name in ("a", "b"):
        request.tasks.add().model_spec.name = name
    assert model_spec_of("MultiInference", request.SerializeToString())[0].name == "a"


def test_appended_spec_overrides_name_and_version() -> None:
    original = predict_bytes("m")
    override = predict_pb2.PredictRequest()
    override.model_spec.name = "m@r7"
    override.model_spec.version.value = 7
    labelled = predict_pb2.PredictRequest.FromString(original)
    labelled.model_spec.version_label = "stable"
    for data in (original, labelled.SerializeToString()):
        parsed = predict_pb2.PredictRequest.FromString(
            data + encode_len_field(1, override.model_spec.SerializeToString())
        )
        assert parsed.model_spec.name == "m@r7" and parsed.model_spec.version.value == 7
        assert parsed.model_spec.WhichOneof("version_choice") == "version"
        assert len(parsed.inputs["x"].tensor_content) == 4000 and list(parsed.output_filter) == [
            "y"
        ]


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05abc", b"\x0a", b"\x80", b"\x0b", b"\x00\x01", b"\x0a\xff\xff\xff\xff\x0f\x01"],
)
def test_malformed_framing_is_rejected(data: bytes) -> None:
    with pytest.raises(WireError):
        field_bytes(data, 1)
    with pytest.raises(InvalidArgument) as info:
        model_spec_of("Predict", data)
    # names the message the method expects, and no other (the small-request parse uses another)
    assert "tensorflow.serving.PredictRequest" in info.value.message
    assert "GetModelStatusRequest" not in info.value.message


def test_a_walk_stops_after_max_fields() -> None:
    """Millions of tiny fields cost the event loop MAX_FIELDS steps, not millions."""
    spec = encode_len_field(1, model_pb2.ModelSpec(name="m").SerializeToString())
    junk = b"\x78\x00" * 500_000  # field 15, varint 0: 1 MB of 2-byte fields
    payload, whole = field_bytes(spec + junk, 1)
    assert model_pb2.ModelSpec.FromString(payload).name == "m" and not whole
    started = time.perf_counter()
    found, partial = model_spec_of("Predict", spec + junk)
    assert time.perf_counter() - started < 0.05
    assert found.name == "m" and partial
    with pytest.raises(InvalidArgument, match="no model_spec among its first"):
        model_spec_of("Predict", junk + spec)
    task = encode_len_field(1, spec)
    with pytest.raises(InvalidArgument, match="MultiInferenceRequest of more than"):
        model_spec_of("MultiInference", task + junk)


def test_missing_model_name() -> None:
    with pytest.raises(InvalidArgument, match=r"model_spec\.name"):
        model_spec_of("Predict", b"")


def test_typed_round_trip_keeps_bytes() -> None:
    values = np.arange(12, dtype="<i8").reshape(3, 4)
    ours = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_INT64, shape=[3, 4], content=values.tobytes()
    )
    proto = tf_tensor_pb2.TensorProto()
    typed_to_proto("x", ours, proto)
    assert proto.dtype == types_pb2.DT_INT64 and proto.tensor_content == values.tobytes()
    back = tensor_pb2.Tensor()
    proto_to_typed(proto, back)
    assert back == ours
    np.testing.assert_array_equal(proto_to_numpy(proto), values)


def test_typed_strings() -> None:
    ours = tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_STRING, shape=[2], string_values=[b"a", b"b"]
    )
    proto = tf_tensor_pb2.TensorProto()
    typed_to_proto("s", ours, proto)
    assert list(proto.string_val) == [b"a", b"b"] and proto_to_json(proto) == ["a", "b"]


def test_typed_rejects_unset_dtype_and_bad_length() -> None:
    with pytest.raises(InvalidArgument, match="dtype"):
        typed_to_proto(
            "x", tensor_pb2.Tensor(shape=[1], content=b"\0" * 4), tf_tensor_pb2.TensorProto()
        )
    with pytest.raises(InvalidArgument, match="needs 2 string_values"):
        typed_to_proto(
            "x",
            tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_STRING, shape=[2], string_values=[b"a"]),
            tf_tensor_pb2.TensorProto(),
        )


def test_json_uses_signature_dtype_and_shape() -> None:
    proto = tf_tensor_pb2.TensorProto()
    json_to_proto(
        "x", [[1, 2], [3, 4]], proto, tf_dtype=types_pb2.DT_INT64, signature_shape=(-1, 2)
    )
    assert [d.size for d in proto.tensor_shape.dim] == [2, 2]
    assert proto_to_json(proto) == [[1, 2], [3, 4]]
    scalar = tf_tensor_pb2.TensorProto()
    json_to_proto("x", 5.5, scalar, tf_dtype=types_pb2.DT_FLOAT, signature_shape=(-1,))
    assert proto_to_json(scalar) == [5.5]


def test_json_rejects_fractions_for_integers() -> None:
    with pytest.raises(InvalidArgument, match="integers"):
        json_to_proto(
            "x",
            [1.5],
            tf_tensor_pb2.TensorProto(),
            tf_dtype=types_pb2.DT_INT32,
            signature_shape=None,
        )


def test_typed_fields_without_tensor_content() -> None:
    proto = tf_tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[2.0])
    proto.tensor_shape.dim.add().size = 3
    assert proto_to_json(proto) == [2.0, 2.0, 2.0]  # TF repeats the last value
    half = tf_tensor_pb2.TensorProto(
        dtype=types_pb2.DT_HALF, half_val=[np.float16(1.5).view(np.uint16)]
    )
    assert proto_to_json(half) == 1.5


@pytest.mark.parametrize(
    ("inferentia", "gpu_only", "placed"),
    [(False, False, {"cpu", "gpu"}), (False, True, {"gpu"}), (True, False, {"inferentia"})],
)
def test_placement_by_accelerator(inferentia: bool, gpu_only: bool, placed: set[str]) -> None:
    model = single_servable("m", "api", inferentia, "/v/m", (1,), gpu_only)
    backends = {
        a: BackendConfig(name=a, address="127.0.0.1:1", accelerator=a)
        for a in ("cpu", "gpu", "inferentia")
    }
    assert {a for a, b in backends.items() if model.placed_on(b)} == placed


def test_json_strings_must_be_strings() -> None:
    with pytest.raises(InvalidArgument, match="strings"):
        json_to_proto(
            "s",
            [True],
            tf_tensor_pb2.TensorProto(),
            tf_dtype=types_pb2.DT_STRING,
            signature_shape=None,
        )

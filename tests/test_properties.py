"""Property-based tests (hypothesis) of the pieces that turn hostile input into precise statuses:
non-finite numbers in JSON tensors, bounded echo, bytes that do not parse, label validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.facade import _REQUEST, model_spec_of
from gateway.api.models import check_label
from gateway.errors import ECHO_LIMIT, STATUS_LIMIT, InvalidArgument, bounded, parse, shown
from gateway.tensors import (
    in_modelmux_names,
    json_to_proto,
    proto_to_json,
    struct_from,
    struct_values,
)
from gateway.wire import encode_len_field
from modelmux.v1 import inference_pb2, models_pb2
from modelmux_common.config import ConfigError, load
from modelmux_common.tfserving import model_pb2, predict_pb2, types_pb2
from modelmux_common.tfserving import tensor_pb2 as tf_tensor_pb2

# derandomized and without an example database: the same examples on every run and in CI
settings.register_profile(
    "modelmux", max_examples=200, deadline=None, derandomize=True, database=None
)
settings.load_profile("modelmux")

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


# --- item 3: NaN and ±Infinity in JSON tensors ------------------------------------------------


@given(
    dtype=st.sampled_from(sorted(FLOAT_DTYPES)),
    data=st.data(),
)
def test_non_finite_floats_round_trip_through_json(dtype: int, data: st.DataObject) -> None:
    width = FLOAT_DTYPES[dtype]
    values = data.draw(st.lists(st.floats(width=width), max_size=20))  # NaN and ±inf included
    sent = [as_json(v) for v in values]
    proto = tf_tensor_pb2.TensorProto()
    json_to_proto("x", sent, proto, tf_dtype=dtype, signature_shape=[-1])
    back = proto_to_json(proto)
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
    got = struct_values(struct)["x"]
    proto = tf_tensor_pb2.TensorProto()
    json_to_proto("x", got, proto, tf_dtype=types_pb2.DT_DOUBLE, signature_shape=[-1])
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
        json_to_proto(
            "x", [1.0, text], tf_tensor_pb2.TensorProto(), tf_dtype=types_pb2.DT_FLOAT,
            signature_shape=[-1],
        )  # fmt: skip


def test_dtype_names_in_the_callers_api() -> None:
    text = "input 'x': expected dtype DT_FLOAT, got DT_INT32 (DT_RESOURCE stays)"
    assert in_modelmux_names(text) == (
        "input 'x': expected dtype DATA_TYPE_FLOAT32, got DATA_TYPE_INT32 (DT_RESOURCE stays)"
    )


# --- item 4: bounded echo ---------------------------------------------------------------------


@given(text=st.text(max_size=5000), quote=st.booleans())
def test_echo_is_bounded_and_whole_when_short(text: str, quote: bool) -> None:
    out = shown(text, quote=quote)
    if len(text) <= ECHO_LIMIT:
        assert out == (repr(text) if quote else text)
    else:
        assert len(out) <= 4 * ECHO_LIMIT + 40 and f"({len(text)} characters)" in out
    assert len(bounded(text * 3)) <= STATUS_LIMIT + 40


# --- item 5: bytes that do not parse ----------------------------------------------------------


@given(data=st.binary(max_size=300), method=st.sampled_from(sorted(_REQUEST)))
def test_any_bytes_give_a_spec_or_invalid_argument(data: bytes, method: str) -> None:
    try:
        spec, _ = model_spec_of(method, data)
    except InvalidArgument as exc:
        assert "GetModelStatusRequest" not in exc.message
        return
    assert spec.name


@given(
    name=st.text(min_size=1, max_size=50),
    junk=st.lists(st.binary(max_size=8), max_size=400),
)
def test_walked_spec_is_the_parsed_one_or_pinned(name: str, junk: list[bytes]) -> None:
    """However many fields follow, the spec the gateway routes by is the one a full parse merges,
    or the walk says it stopped (and the forwarder then pins the spec it resolved)."""
    spec = model_pb2.ModelSpec(name=name)
    filler = b"".join(encode_len_field(3, j) for j in junk)  # output_filter entries
    big = b"\x12\x00" * 9000  # an empty inputs entry, repeated: over the whole-parse size
    data = encode_len_field(1, spec.SerializeToString()) + filler + big
    found, partial = model_spec_of("Predict", data)
    assert found.name == name
    if not partial:
        assert predict_pb2.PredictRequest.FromString(data).model_spec == found


@given(
    cls=st.sampled_from(
        [
            inference_pb2.PredictRequest,
            inference_pb2.InvokeRequest,
            models_pb2.GetModelRequest,
            models_pb2.SetVersionLabelRequest,
            models_pb2.SetTrafficSplitRequest,
            models_pb2.WatchModelsRequest,
        ]
    ),
    data=st.binary(max_size=200),
)
def test_parse_answers_invalid_argument_naming_the_message(cls: type, data: bytes) -> None:
    try:
        parse(cls, data)
    except InvalidArgument as exc:
        assert cls.DESCRIPTOR.full_name in exc.message  # type: ignore[attr-defined]


# --- item 6: labels by the same rule as names -------------------------------------------------


@given(
    label=st.one_of(st.text(max_size=200), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,140}\Z"))
)
def test_labels_follow_the_config_rule_for_names(
    label: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A label SetVersionLabel takes is one the config file's version_labels would take."""
    config = tmp_path_factory.mktemp("labels") / "modelmux.yaml"
    config.write_text(json.dumps({"version_labels": {"m": {label: 1}}}))  # JSON is YAML
    try:
        load(config)
        valid = True
    except ConfigError:
        valid = False
    if valid:
        check_label(label)
    else:
        with pytest.raises(InvalidArgument) as info:
            check_label(label)
        assert len(info.value.message) < 4 * ECHO_LIMIT + 200

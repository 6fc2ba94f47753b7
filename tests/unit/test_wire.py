"""Routing a request by its bytes (gateway/wire.py, gateway/facade.py's model_spec_of): field
walking, the bounded walk, and bytes that do not parse."""

from __future__ import annotations

import time

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from gateway.api.facade import _REQUEST, model_spec_of
from gateway.errors import InvalidArgument, parse
from gateway.wire import MAX_FIELDS, WireError, encode_len_field, field_bytes
from modelmux.v1 import inference_pb2 as own_inference_pb2
from modelmux.v1 import models_pb2
from modelmux_common.tfserving import inference_pb2, model_pb2, predict_pb2, types_pb2


def predict_bytes(name: str = "m", version: int | None = None) -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["x"].dtype = types_pb2.DT_FLOAT
    request.inputs["x"].tensor_content = np.arange(1000, dtype="<f4").tobytes()
    request.output_filter.append("y")
    return bytes(request.SerializeToString())


# --- field walking ----------------------------------------------------------------------------


def test_field_bytes_finds_a_field_among_every_wire_type() -> None:
    varint, fixed64, fixed32 = b"\x10\x96\x01", b"\x19" + bytes(8), b"\x25" + bytes(4)
    data = varint + fixed64 + encode_len_field(1, b"spec") + fixed32 + encode_len_field(4, b"z")
    assert field_bytes(data, 1) == (b"spec", True)
    assert field_bytes(data, 4) == (b"z", True)
    assert field_bytes(data, 9) == (b"", True)  # absent
    assert field_bytes(b"", 1) == (b"", True)


def test_repeated_occurrences_merge_or_the_first_is_taken() -> None:
    data = encode_len_field(1, b"ab") + encode_len_field(2, b"-") + encode_len_field(1, b"cd")
    assert field_bytes(data, 1) == (b"abcd", True)  # how an embedded message merges
    assert field_bytes(data, 1, first=True) == (b"ab", True)  # an element of a repeated field


def test_a_long_payload_round_trips() -> None:
    payload = bytes(range(256)) * 100  # a length of three varint bytes
    assert field_bytes(encode_len_field(300, payload), 300) == (payload, True)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x0a\x05abc", "runs past the end"),
        (b"\x0a", "truncated varint"),
        (b"\x80", "truncated varint"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x00\x01", "field number 0"),
        (b"\x0a\xff\xff\xff\xff\x0f\x01", "runs past the end"),
        (b"\x09\x00", "runs past the end"),  # a fixed64 cut short
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    ],
)
def test_malformed_framing_is_rejected(data: bytes, why: str) -> None:
    with pytest.raises(WireError, match=why):
        field_bytes(data, 1)
    with pytest.raises(InvalidArgument) as info:
        model_spec_of("Predict", data)
    # names the message the method expects, and no other (the small-request parse uses another)
    assert "tensorflow.serving.PredictRequest" in info.value.message
    assert "GetModelStatusRequest" not in info.value.message


# --- the bounded walk -------------------------------------------------------------------------


def test_a_walk_reads_at_most_its_limit() -> None:
    data = b"\x08\x01" * 10 + encode_len_field(1, b"late")
    assert field_bytes(data, 1, limit=10) == (b"", False)
    assert field_bytes(data, 1, limit=11) == (b"late", True)
    assert field_bytes(data, 1) == (b"late", True)  # MAX_FIELDS is far more


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
    assert MAX_FIELDS < 500_000


# --- model_spec_of ----------------------------------------------------------------------------


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
        assert len(parsed.inputs["x"].tensor_content) == 4000
        assert list(parsed.output_filter) == ["y"]


def test_missing_model_name() -> None:
    with pytest.raises(InvalidArgument, match=r"model_spec\.name"):
        model_spec_of("Predict", b"")


def test_bytes_that_frame_but_do_not_decode() -> None:
    """Well-framed bytes whose model spec is not a ModelSpec (a string field holding bad UTF-8)."""
    bad_name = encode_len_field(1, encode_len_field(1, b"\xff\xfe"))
    with pytest.raises(InvalidArgument, match=r"tensorflow\.serving\.PredictRequest"):
        model_spec_of("Predict", bad_name)
    with pytest.raises(InvalidArgument, match=r"tensorflow\.serving\.PredictRequest"):
        model_spec_of("Predict", bad_name + b"\x12\x00" * 9000)  # walked, then parsed


# --- any bytes --------------------------------------------------------------------------------


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
            own_inference_pb2.PredictRequest,
            own_inference_pb2.InvokeRequest,
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


def _seeds() -> list[tuple[str, bytes]]:
    multi = inference_pb2.MultiInferenceRequest()
    multi.tasks.add().model_spec.name = "m"
    labelled = predict_pb2.PredictRequest.FromString(predict_bytes("m"))
    labelled.model_spec.version_label = "stable"
    return [
        ("Predict", predict_bytes("m", 3)),  # 4 KB: parsed whole
        ("Predict", predict_bytes("m") * 5),  # 20 KB: walked
        ("Predict", labelled.SerializeToString()),
        ("MultiInference", multi.SerializeToString()),
        (
            "GetModelMetadata",
            encode_len_field(1, model_pb2.ModelSpec(name="m").SerializeToString()),
        ),
    ]


SEEDS = _seeds()


@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 4), st.binary(max_size=4)), min_size=1, max_size=4
    ),
)
def test_a_mutated_request_gives_the_spec_a_parser_sees_or_invalid_argument(
    seed: tuple[str, bytes], edits: list[tuple[float, int, bytes]]
) -> None:
    """Valid requests with bytes cut out and others put in (what a hostile or broken client
    sends): the walk and the small-request parse agree with protobuf's own parser."""
    method, data = seed
    mutated = bytearray(data)
    for where, cut, new in edits:
        at = int(where * len(mutated))
        mutated[at : at + cut] = new
    try:
        spec, partial = model_spec_of(method, bytes(mutated))
    except InvalidArgument as exc:
        assert exc.message.startswith(("request is not a valid tensorflow.serving.", "model_spec"))
        return
    try:
        full = _REQUEST[method].FromString(bytes(mutated))
    except DecodeError:
        return  # routed by its spec; the backend refuses the rest with INVALID_ARGUMENT
    expected = full.tasks[0].model_spec if method == "MultiInference" else full.model_spec
    assert spec.name and (partial or spec == expected)

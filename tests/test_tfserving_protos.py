"""modelmux's own TF Serving definitions (protos/tfserving, modelmux_common.tfserving_protos)
against TensorFlow's own: the same descriptors, file by file; generated modules of the same shape;
and every message the same both ways (bytes, text format and JSON, parsed across), for generated
edge values and for what a real embedded backend answers."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import Proc, start_daemon
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    text_format,
)
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backend.tfserving as official  # TensorFlow's own classes, without its runtime
from modelmux_common import tfserving as ours
from modelmux_common.tfserving_protos import all_messages, file_names, module, pool

META_GRAPH = "tensorflow/core/protobuf/meta_graph.proto"
META_GRAPH_KEPT = ("TensorInfo", "SignatureDef")  # protos/tfserving/README.md
F = FieldDescriptor

# --- descriptors and modules ---------------------------------------------------------------------


def _proto(file_name: str, source: Any) -> descriptor_pb2.FileDescriptorProto:
    out = descriptor_pb2.FileDescriptorProto()
    source.FindFileByName(file_name).CopyToProto(out)
    return out


def tensorflows(file_name: str) -> descriptor_pb2.FileDescriptorProto:
    """TensorFlow's descriptor of ``file_name`` as ours must be: without the language options we
    leave out, and for meta_graph.proto only the messages we define."""
    theirs = _proto(file_name, descriptor_pool.Default())
    theirs.ClearField("options")
    if file_name == META_GRAPH:
        kept = [m for m in theirs.message_type if m.name in META_GRAPH_KEPT]
        theirs.ClearField("message_type")
        theirs.message_type.extend(kept)
        needed = set(_proto(file_name, pool()).dependency)
        assert needed <= set(theirs.dependency)
        deps = [d for d in theirs.dependency if d in needed]
        theirs.ClearField("dependency")
        theirs.dependency.extend(deps)
    return theirs


@pytest.mark.parametrize("file_name", file_names())
def test_each_file_is_tensorflows(file_name: str) -> None:
    mine = text_format.MessageToString(_proto(file_name, pool()))
    assert mine == text_format.MessageToString(tensorflows(file_name))


def test_every_file_of_tf_serving_s_two_services_is_covered() -> None:
    """Every message and enum the two services reach, through any field, is defined here."""
    services = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
    todo: list[Descriptor] = []
    for name in services:
        for method in descriptor_pool.Default().FindServiceByName(name).methods:
            todo += [method.input_type, method.output_type]
        assert pool().FindServiceByName(name).full_name == name
    seen: set[str] = set()
    enums: set[str] = set()
    while todo:
        message = todo.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            if field.message_type is not None:
                todo.append(field.message_type)
            if field.enum_type is not None:
                enums.add(field.enum_type.full_name)
    for name in seen:
        assert pool().FindMessageTypeByName(name).full_name == name
    for name in enums:
        assert pool().FindEnumTypeByName(name).full_name == name
    assert len(seen) > 60  # PredictRequest, TensorProto, SignatureDef, ModelServerConfig, ...


def _python_module(file_name: str) -> Any:
    """TensorFlow's generated module of ``file_name`` (TensorFlow vendors xla/ under
    tensorflow.compiler, so the module is found by its descriptor, not by its path)."""
    for loaded in list(sys.modules.values()):
        file = getattr(loaded, "DESCRIPTOR", None)
        if getattr(file, "name", None) == file_name and file.pool is descriptor_pool.Default():
            return loaded
    raise LookupError(f"no generated module of {file_name} is loaded")


def _public(namespace: Any) -> set[str]:
    return {
        k
        for k, v in vars(namespace).items()
        if not k.startswith("_") and not isinstance(v, type(sys))
    }


@pytest.mark.parametrize(
    "file_name",
    # a file that only re-exports another (import public) has nothing of its own to compare
    [n for n in file_names() if not _proto(n, pool()).public_dependency],
)
def test_each_module_has_what_the_generated_one_has(file_name: str) -> None:
    mine, theirs = module(file_name), _python_module(file_name)
    if file_name == META_GRAPH:
        assert _public(mine) == {"DESCRIPTOR", *META_GRAPH_KEPT}
        assert _public(mine) <= _public(theirs)
    else:
        assert _public(mine) == _public(theirs)
    for name in _public(mine) - {"DESCRIPTOR"}:
        value = getattr(mine, name)
        if isinstance(value, int):  # a top-level enum value
            assert value == getattr(theirs, name)
        else:
            assert value.DESCRIPTOR.full_name == getattr(theirs, name).DESCRIPTOR.full_name


def test_the_gateway_s_names_are_ours_and_not_tensorflow_s() -> None:
    assert ours.predict_pb2.PredictRequest is not official.predict_pb2.PredictRequest
    assert ours.predict_pb2.PredictRequest.DESCRIPTOR.file.pool is pool()
    states = ours.get_model_status_pb2.ModelVersionStatus
    assert states.State.Name(states.AVAILABLE) == "AVAILABLE" == states.State.Name(30)
    assert ours.types_pb2.DT_HALF == official.types_pb2.DT_HALF == ours.types_pb2.DataType.DT_HALF


# --- the same message both ways --------------------------------------------------------------


def mine_of(full_name: str) -> type[Message]:
    for name in file_names():
        module(name)  # builds the classes generated code would have
    return message_factory.GetMessageClass(pool().FindMessageTypeByName(full_name))


def theirs_of(full_name: str) -> type[Message]:
    found = descriptor_pool.Default().FindMessageTypeByName(full_name)
    return message_factory.GetMessageClass(found)


def pool_of(message: Message) -> Any:
    return message.DESCRIPTOR.file.pool


def assert_same(a: Message, b: Message) -> None:
    """Same bytes (deterministic), text format and JSON: what grpcurl and reflection show too."""
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert text_format.MessageToString(
        a, descriptor_pool=pool_of(a)
    ) == text_format.MessageToString(b, descriptor_pool=pool_of(b))
    assert json_format.MessageToJson(
        a, descriptor_pool=pool_of(a), sort_keys=True
    ) == json_format.MessageToJson(b, descriptor_pool=pool_of(b), sort_keys=True)


def assert_round_trips(mine: Message, theirs: Message) -> None:
    """Built alike they match, and each side's bytes parse on the other side to the same."""
    assert_same(mine, theirs)
    assert_same(type(theirs).FromString(mine.SerializeToString()), theirs)
    assert_same(type(mine).FromString(theirs.SerializeToString()), mine)


_INTEGERS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
ANY = "google.protobuf.Any"
PACKED_IN_ANY = "tensorflow.serving.ModelSpec"


def _enum_values(enum: EnumDescriptor) -> st.SearchStrategy[int]:
    known = st.sampled_from([v.number for v in enum.values])
    # open enums keep numbers they do not know, and both sides must keep them alike
    return st.one_of(known, st.integers(-(2**31), 2**31 - 1))


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INTEGERS:
        low, high = _INTEGERS[kind]
        return st.one_of(st.sampled_from([low, high, 0, 1]), st.integers(low, high))
    if kind == F.TYPE_DOUBLE:
        return st.floats()  # NaN, infinities, -0.0 and subnormals included
    if kind == F.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind == F.TYPE_STRING:
        return st.text(max_size=12)
    if kind == F.TYPE_BYTES:
        return st.binary(max_size=12)
    assert kind == F.TYPE_ENUM, field.full_name
    return _enum_values(field.enum_type)


def _single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is None:
        return scalar(field)
    if field.message_type.full_name == ANY:
        return message_values(PACKED_IN_ANY, depth - 1)
    return message_values(field.message_type.full_name, depth - 1)


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(scalar(key), _single(value, depth), max_size=3)
    if field.is_repeated:
        return st.lists(_single(field, depth), max_size=3)
    return _single(field, depth)


_CACHE: dict[tuple[str, int], st.SearchStrategy[dict[str, Any]]] = {}


def message_values(full_name: str, depth: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    """Field name -> value for one message: any subset of its fields set (zero values too, which
    oneof members and proto3 optional fields keep as present), at most one member per oneof,
    nested messages down to ``depth``."""
    if (full_name, depth) in _CACHE:
        return _CACHE[(full_name, depth)]
    descriptor = pool().FindMessageTypeByName(full_name)
    if depth <= 0:
        return st.just({})
    plain = {
        f.name: field_values(f, depth)
        for f in descriptor.fields
        if f.containing_oneof is None or len(f.containing_oneof.fields) == 1
    }
    choices = [
        st.one_of(
            st.just({}), *[field_values(f, depth).map(lambda v, n=f.name: {n: v}) for f in o.fields]
        )
        for o in descriptor.oneofs
        if len(o.fields) > 1
    ]
    strategy = st.tuples(st.fixed_dictionaries({}, optional=plain), *choices).map(
        lambda parts: {k: v for part in parts for k, v in part.items()}
    )
    _CACHE[(full_name, depth)] = strategy
    return strategy


def fill(message: Message, values: dict[str, Any]) -> Message:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            for key, item in value.items():
                if entry.fields_by_name["value"].message_type is None:
                    target[key] = item
                else:
                    _fill_single(target[key], item)
        elif field.is_repeated:
            if field.message_type is None:
                target.extend(value)
            else:
                for item in value:
                    _fill_single(target.add(), item)
        elif field.message_type is not None:
            _fill_single(target, value)
        else:
            setattr(message, name, value)
    return message


def _fill_single(target: Message, values: dict[str, Any]) -> None:
    if target.DESCRIPTOR.full_name == ANY:
        packed = pool_of(target).FindMessageTypeByName(PACKED_IN_ANY)
        target.Pack(fill(message_factory.GetMessageClass(packed)(), values))
    else:
        target.SetInParent()
        fill(target, values)


MESSAGES = sorted(m.full_name for m in all_messages() if not m.GetOptions().map_entry)


@pytest.mark.parametrize("full_name", MESSAGES)
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_message_round_trips(full_name: str, data: st.DataObject) -> None:
    values = data.draw(message_values(full_name), label="fields")
    assert_round_trips(fill(mine_of(full_name)(), values), fill(theirs_of(full_name)(), values))


def test_unknown_fields_survive_both_ways() -> None:
    """Bytes of a newer TF Serving (a field neither side knows) pass through either unchanged."""
    known = official.model_pb2.ModelSpec(name="m", signature_name="s")
    extra = b"\xa8\x06\x07" + b"\xb2\x06\x03abc"  # field 101 varint 7, field 102 bytes "abc"
    data = known.SerializeToString() + extra
    mine = ours.model_pb2.ModelSpec.FromString(data)
    assert mine.name == "m" and mine.SerializeToString().endswith(extra)
    assert official.model_pb2.ModelSpec.FromString(
        mine.SerializeToString()
    ).SerializeToString() == (data)


# --- what a real backend sends -----------------------------------------------------------------

X = [1.0, 2.0, 5.0]
DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
}
TF_DTYPES = {
    "float32": "DT_FLOAT",
    "float64": "DT_DOUBLE",
    "float16": "DT_HALF",
    **{n: f"DT_{n.upper()}" for n in DTYPES if n.startswith(("int", "uint"))},
    "bool": "DT_BOOL",
}


SERVED = {"half_plus_two": (1, 2), "iris": (1,), "half_plus_two_inf": (1,), "dtypes": (1,)}


@pytest.fixture(scope="module")
def tf_backend(example_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """An embedded backend serving the example models from a start-up config."""
    entries = " ".join(
        f'config {{ name: "{name}" base_path: "{example_models / name}" model_platform: '
        f'"tensorflow" model_version_policy {{ specific {{ {" ".join(f"versions: {v}" for v in versions)} }} }} }}'
        for name, versions in SERVED.items()
    )
    config = tmp_path_factory.mktemp("tfs") / "models.pbtxt"
    config.write_text(f"model_config_list {{ {entries} }}")
    proc = start_daemon(
        ["backend", "--listen", "127.0.0.1:0", "--model-config-file", str(config)], timeout=180
    )
    try:
        wait_available(proc.address, timeout=120)
        yield proc
    finally:
        proc.stop()


def wait_available(address: str, *, timeout: float) -> None:
    """Until every version of SERVED is AVAILABLE (the backend loads after it starts serving)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = official.model_service_pb2_grpc.ModelServiceStub(channel)
        for name, versions in SERVED.items():
            request = official.get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = name
            while True:
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.GetModelStatus(request, timeout=5)
                    ready = {s.version for s in reply.model_version_status if s.state == AVAILABLE}
                    if ready >= set(versions):
                        break
                assert time.monotonic() < deadline, f"{name} {versions} never became AVAILABLE"
                time.sleep(0.05)


def call(address: str, method: str, request: Message) -> bytes:
    """One call with the request's bytes, answered as bytes (neither side's classes on the wire)."""
    with grpc.insecure_channel(address) as channel:
        rpc = channel.unary_unary(method)
        reply: bytes = rpc(request.SerializeToString(), timeout=30, wait_for_ready=True)
        return reply


def both(full_name: str, data: bytes) -> tuple[Message, Message]:
    """``data`` parsed by our class and by TensorFlow's."""
    return mine_of(full_name).FromString(data), theirs_of(full_name).FromString(data)


def assert_request_and_reply(address: str, method: str, request: Message, reply_type: str) -> Any:
    """Our request parses to the same on TensorFlow's side; the backend's reply (made by
    TensorFlow's classes) parses to the same on ours. Returns our reply."""
    theirs = type(theirs_of(request.DESCRIPTOR.full_name)())
    assert_same(request, theirs.FromString(request.SerializeToString()))
    mine, theirs_reply = both(reply_type, call(address, method, request))
    assert_same(mine, theirs_reply)
    return mine


PREDICTION = "/tensorflow.serving.PredictionService/"
AVAILABLE = official.get_model_status_pb2.ModelVersionStatus.AVAILABLE


def test_predict_of_every_dtype_round_trips(tf_backend: Proc) -> None:
    request = ours.predict_pb2.PredictRequest()
    request.model_spec.name = "dtypes"
    for name, dtype in DTYPES.items():
        array = (np.arange(6) % 2 if dtype is np.bool_ else np.arange(6) - 2).astype(dtype)
        tensor = request.inputs[name]
        tensor.dtype = ours.types_pb2.DataType.Value(TF_DTYPES[name])
        tensor.tensor_shape.dim.add(size=2)
        tensor.tensor_shape.dim.add(size=3)
        tensor.tensor_content = array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    strings = request.inputs["string"]
    strings.dtype = ours.types_pb2.DT_STRING
    strings.tensor_shape.dim.add(size=3)
    strings.string_val.extend([b"", "r\u00e9sum\u00e9".encode(), bytes(range(256))])
    reply = assert_request_and_reply(
        tf_backend.address, PREDICTION + "Predict", request, "tensorflow.serving.PredictResponse"
    )
    assert set(reply.outputs) == set(request.inputs)
    assert list(reply.outputs["string"].string_val) == list(strings.string_val)


def test_predict_with_float_values_round_trips(tf_backend: Proc) -> None:
    request = ours.predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.model_spec.version.value = 1
    request.inputs["x"].dtype = ours.types_pb2.DT_FLOAT
    request.inputs["x"].tensor_shape.dim.add(size=4)
    request.inputs["x"].float_val.extend([*X, math.inf])
    reply = assert_request_and_reply(
        tf_backend.address, PREDICTION + "Predict", request, "tensorflow.serving.PredictResponse"
    )
    y = np.frombuffer(reply.outputs["y"].tensor_content, np.float32)
    assert list(y) == [2.5, 3.0, 4.5, math.inf] and reply.model_spec.version.value == 1


@pytest.mark.parametrize("model", sorted(SERVED))
def test_model_metadata_round_trips(tf_backend: Proc, model: str) -> None:
    request = ours.get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    reply = assert_request_and_reply(
        tf_backend.address,
        PREDICTION + "GetModelMetadata",
        request,
        "tensorflow.serving.GetModelMetadataResponse",
    )
    mine = ours.get_model_metadata_pb2.SignatureDefMap()
    assert reply.metadata["signature_def"].Unpack(mine)
    theirs = official.get_model_metadata_pb2.SignatureDefMap.FromString(mine.SerializeToString())
    assert_same(mine, theirs)
    assert "serving_default" in mine.signature_def


def test_status_round_trips(tf_backend: Proc) -> None:
    request = ours.get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "half_plus_two"
    reply = assert_request_and_reply(
        tf_backend.address,
        "/tensorflow.serving.ModelService/GetModelStatus",
        request,
        "tensorflow.serving.GetModelStatusResponse",
    )
    states = {s.version: s.state for s in reply.model_version_status}
    available = ours.get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states == {1: available, 2: available}


def _examples(target: Any, xs: list[float]) -> None:
    for x in xs:
        target.input.example_list.examples.add().features.feature["x"].float_list.value.append(x)


def test_classify_regress_and_multi_inference_round_trip(tf_backend: Proc) -> None:
    spec = ours.model_pb2.ModelSpec(name="half_plus_two_inf", signature_name="classify_x_to_y")
    classify = ours.classification_pb2.ClassificationRequest(model_spec=spec)
    _examples(classify, X)
    result = assert_request_and_reply(
        tf_backend.address,
        PREDICTION + "Classify",
        classify,
        "tensorflow.serving.ClassificationResponse",
    ).result
    assert [c.classes[0].score for c in result.classifications] == [2.5, 3.0, 4.5]
    regress = ours.regression_pb2.RegressionRequest(model_spec=spec)
    regress.model_spec.signature_name = "regress_x_to_y"
    _examples(regress, X)
    assert_request_and_reply(
        tf_backend.address, PREDICTION + "Regress", regress, "tensorflow.serving.RegressionResponse"
    )
    multi = ours.inference_pb2.MultiInferenceRequest()
    multi.tasks.add(model_spec=classify.model_spec, method_name="tensorflow/serving/classify")
    multi.tasks.add(model_spec=regress.model_spec, method_name="tensorflow/serving/regress")
    context = multi.input.example_list_with_context
    context.context.features.feature["unused"].bytes_list.value.append(b"ctx")
    context.examples.add().features.feature["x"].float_list.value.append(0.0)
    reply = assert_request_and_reply(
        tf_backend.address,
        PREDICTION + "MultiInference",
        multi,
        "tensorflow.serving.MultiInferenceResponse",
    )
    assert reply.results[1].regression_result.regressions[0].value == 2.0


def test_a_reload_config_as_the_gateway_sends_it_round_trips(
    tf_backend: Proc, example_models: Path
) -> None:
    request = ours.model_management_pb2.ReloadConfigRequest()
    for name, versions in (("half_plus_two", [1, 2]), ("iris", [1]), ("dtypes", [1])):
        entry = request.config.model_config_list.config.add(
            name=name, base_path=str(example_models / name), model_platform="tensorflow"
        )
        entry.model_version_policy.specific.versions.extend(versions)
    request.config.model_config_list.config[0].version_labels["stable"] = 1
    reply = assert_request_and_reply(
        tf_backend.address,
        "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
        request,
        "tensorflow.serving.ReloadConfigResponse",
    )
    assert reply.status.error_code == 0, reply.status.error_message
    # its JSON keeps TF Serving's own names (error_code, not errorCode)
    failed = ours.model_management_pb2.ReloadConfigResponse()
    failed.status.error_code = 3
    assert '"error_code": "INVALID_ARGUMENT"' in json_format.MessageToJson(failed)

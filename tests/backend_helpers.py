"""Helpers for tests/test_backend.py: TF Serving requests built by hand, no TensorFlow runtime.

The test process only loads TF Serving's own message classes (``backend.tfserving``), not the
TensorFlow runtime, so it stays light; tensors are built and read with numpy.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import text_format

from backend.tfserving import (
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    predict_pb2,
    tensor_pb2,
    types_pb2,
)

_NUMPY = {
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
}


@dataclass(frozen=True)
class Model:
    """One ``model_config_list.config`` entry, written as text format."""

    name: str
    base_path: Path | str
    policy: str = (
        ""  # e.g. "all {}", "specific { versions: 1 versions: 2 }", "latest { num_versions: 1 }"
    )
    labels: tuple[tuple[str, int], ...] = ()
    extra: str = ""

    def text(self) -> str:
        parts = [f'name: "{self.name}"']
        if str(self.base_path):
            parts.append(f'base_path: "{self.base_path}"')
        if self.policy:
            parts.append(f"model_version_policy {{ {self.policy} }}")
        parts.extend(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in self.labels)
        if self.extra:
            parts.append(self.extra)
        return "config { " + " ".join(parts) + " }"


def config_text(models: Sequence[Model]) -> str:
    return "model_config_list { " + " ".join(m.text() for m in models) + " }"


def reload_request(models: Sequence[Model]) -> model_management_pb2.ReloadConfigRequest:
    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(config_text(models), request.config)
    return request


def spec(
    name: str, *, version: int | None = None, label: str | None = None, signature: str = ""
) -> model_pb2.ModelSpec:
    out = model_pb2.ModelSpec(name=name, signature_name=signature)
    if version is not None:
        out.version.value = version
    if label is not None:
        out.version_label = label
    return out


def floats(values: Sequence[float], shape: Sequence[int] | None = None) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=list(values))
    for size in shape if shape is not None else [len(values)]:
        proto.tensor_shape.dim.add(size=size)
    return proto


def predict_request(
    model: model_pb2.ModelSpec, **inputs: tensor_pb2.TensorProto
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model_spec=model)
    for name, proto in inputs.items():
        request.inputs[name].CopyFrom(proto)
    return request


def to_numpy(proto: tensor_pb2.TensorProto) -> np.ndarray:
    dtype, field = _NUMPY[proto.dtype]
    shape = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    return np.array(getattr(proto, field), dtype=dtype).reshape(shape)


async def version_states(stub: object, name: str) -> dict[int, str]:
    """``{version: state name}`` from GetModelStatus; empty when the model is NOT_FOUND."""
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=name))
    try:
        response = await stub.GetModelStatus(request, timeout=5)  # type: ignore[attr-defined]
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return {}
        raise
    state = get_model_status_pb2.ModelVersionStatus.State
    return {s.version: state.Name(s.state) for s in response.model_version_status}


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, what: str, timeout: float = 20.0
) -> None:
    """Polls ``check`` until it is true; fails after ``timeout`` seconds naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_for_states(
    stub: object, name: str, expected: dict[int, str], *, timeout: float = 20.0
) -> None:
    last: dict[int, str] = {}

    async def check() -> bool:
        nonlocal last
        last = await version_states(stub, name)
        return all(last.get(v) == s for v, s in expected.items())

    try:
        await wait_until(check, what=f"{name} to reach {expected}", timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {last}") from None


def publish_version(source: Path, base_path: Path, version: int) -> None:
    """Copies a version folder in the way a syncer must: stage beside it, then rename into place."""
    staging = base_path / f".staging-{version}"
    shutil.copytree(source, staging)
    os.rename(staging, base_path / str(version))


def retract_version(base_path: Path, version: int) -> None:
    """Removes a version folder with one rename, so a poll never sees it half deleted."""
    gone = base_path / f".removed-{version}"
    os.rename(base_path / str(version), gone)
    shutil.rmtree(gone)

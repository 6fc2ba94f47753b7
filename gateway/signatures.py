"""A model's signatures as the gateway reads them from GetModelMetadata: the inputs' and outputs'
dtypes and shapes, for JSON conversion and input name checks (the API and handler clients)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidArgument, shown


@dataclass(frozen=True, slots=True)
class TensorSpec:
    dtype: int
    # None for unknown rank; -1 for unknown dimensions
    shape: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


def check_input_names(names: Iterable[str], signature: Signature, signature_name: str) -> None:
    """INVALID_ARGUMENT for an input the signature does not have: one wording for JSON and typed
    requests."""
    unknown = sorted(n for n in names if n not in signature.inputs)
    if unknown:
        expected = ", ".join(sorted(signature.inputs)) or "none"
        raise InvalidArgument(
            f"unknown input {shown(unknown[0])}: signature {signature_name!r} has the inputs {expected}"
        )


def specs(infos: Any) -> dict[str, TensorSpec]:
    """TensorInfo map (a SignatureDef's inputs or outputs) -> name -> spec."""
    out = {}
    for name, info in infos.items():
        shape = (
            None if info.tensor_shape.unknown_rank else tuple(d.size for d in info.tensor_shape.dim)
        )
        out[name] = TensorSpec(info.dtype, shape)
    return out

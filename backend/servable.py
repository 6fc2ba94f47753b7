"""One loaded SavedModel version: its signature defs and a thread-safe way to run them.

Everything here is blocking TensorFlow work; the manager calls it from worker threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import message, text_format
from tensorflow.core.protobuf import saved_model_pb2

from backend.errors import InvalidArgument, ServingError, status_code
from backend.tfserving import meta_graph_pb2
from modelmux_common.config import Accelerator

SERVE_TAG = "serve"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

tf.get_logger().setLevel("ERROR")


class LoadError(ServingError):
    """A version that cannot be served; the message says why, as TF Serving's status would."""


@dataclass(frozen=True, slots=True)
class Servable:
    """A loaded version. ``root`` keeps the loaded object (and so its variables) alive."""

    model: str
    version: int
    path: Path
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]
    functions: Mapping[str, Callable[..., Mapping[str, tf.Tensor]]]
    root: Any

    def signature(self, name: str) -> meta_graph_pb2.SignatureDef:
        sigdef = self.signature_defs.get(name)
        if sigdef is None:
            available = ", ".join(sorted(self.signature_defs)) or "none"
            raise InvalidArgument(
                f"model {self.model!r} version {self.version} has no signature {name!r}; "
                f"available: {available}"
            )
        return sigdef

    def run(
        self, signature: str, inputs: Mapping[str, np.ndarray], outputs: Iterable[str]
    ) -> dict[str, np.ndarray]:
        """Runs ``signature`` (blocking); TensorFlow errors keep their canonical status code."""
        function = self.functions[signature]
        feeds = {name: tf.constant(value) for name, value in inputs.items()}
        try:
            result = function(**feeds)
            return {name: result[name].numpy() for name in outputs}
        except tf.errors.OpError as exc:
            raise ServingError(
                f"model {self.model!r} version {self.version} signature {signature!r}: "
                f"{exc.message}",
                code=status_code(exc.error_code),
            ) from exc
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"model {self.model!r} version {self.version} signature {signature!r}: {exc}"
            ) from exc


def check_layout(path: Path, accelerator: Accelerator) -> None:
    """Refuses what the accelerator's model server would refuse, with the reason."""
    if not path.is_dir():
        raise LoadError(f"{path} is not a folder", code=grpc.StatusCode.NOT_FOUND)
    if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
        raise LoadError(
            f"no saved_model.pb or saved_model.pbtxt in {path}", code=grpc.StatusCode.NOT_FOUND
        )
    if accelerator == "inferentia" and (path / "variables").exists():
        raise LoadError(
            f"{path} has a variables/ folder, so it is not a model compiled for Inferentia; "
            "an inferentia backend serves the Inferentia layout only (saved_model.pb, no variables/)",
            code=grpc.StatusCode.FAILED_PRECONDITION,
        )


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The signature defs of the MetaGraph tagged ``serve``, read from saved_model.pb(txt)."""
    saved = saved_model_pb2.SavedModel()
    binary = path / "saved_model.pb"
    try:
        if binary.is_file():
            saved.ParseFromString(binary.read_bytes())
        else:
            text_format.Parse((path / "saved_model.pbtxt").read_text(encoding="utf-8"), saved)
    except (message.DecodeError, text_format.ParseError, OSError) as exc:
        raise LoadError(
            f"cannot read the SavedModel in {path}: {exc}", code=grpc.StatusCode.DATA_LOSS
        ) from exc
    for meta_graph in saved.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return {
                name: sigdef
                for name, sigdef in meta_graph.signature_def.items()
                if not name.startswith("__")
            }
    raise LoadError(
        f"the SavedModel in {path} has no MetaGraph tagged {SERVE_TAG!r}",
        code=grpc.StatusCode.NOT_FOUND,
    )


def load(*, model: str, version: int, path: Path, accelerator: Accelerator) -> Servable:
    """Loads one version (blocking). Raises :class:`LoadError` with the reason."""
    check_layout(path, accelerator)
    signature_defs = read_signature_defs(path)
    try:
        root = tf.saved_model.load(str(path), tags=[SERVE_TAG])
    except tf.errors.OpError as exc:
        raise LoadError(exc.message, code=status_code(exc.error_code)) from exc
    except (ValueError, OSError) as exc:
        raise LoadError(f"{type(exc).__name__}: {exc}") from exc
    functions = dict(getattr(root, "signatures", {}))
    usable = {name: sigdef for name, sigdef in signature_defs.items() if name in functions}
    if not usable:
        raise LoadError(f"the SavedModel in {path} has no serving signatures")
    return Servable(
        model=model,
        version=version,
        path=path,
        signature_defs=usable,
        functions={name: functions[name] for name in usable},
        root=root,
    )

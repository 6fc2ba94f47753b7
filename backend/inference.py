"""Classify and Regress: tf.Example input, classification/regression signatures (TF Serving's rules).

A classification signature has one string input (the serialized examples) and outputs ``classes``
(string [batch, k]) and/or ``scores`` (float [batch, k]); a regression signature has one string
input and the float output ``outputs`` ([batch] or [batch, 1]).
"""

from __future__ import annotations

import numpy as np
from tensorflow_serving.apis import input_pb2

from backend.errors import InvalidArgument
from backend.servable import CLASSIFY_METHOD, REGRESS_METHOD, Servable
from backend.tfserving import (
    classification_pb2,
    meta_graph_pb2,
    regression_pb2,
    types_pb2,
)

_KIND = {CLASSIFY_METHOD: "classification", REGRESS_METHOD: "regression"}


def serialized_examples(request_input: input_pb2.Input) -> list[bytes]:
    """The request's tf.Examples, serialized; context features are merged into each example."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = list(request_input.example_list.examples)
    elif kind == "example_list_with_context":
        with_context = request_input.example_list_with_context
        examples = []
        for example in with_context.examples:
            merged = type(example)()
            merged.CopyFrom(with_context.context)
            merged.MergeFrom(example)
            examples.append(merged)
    else:
        examples = []
    if not examples:
        raise InvalidArgument("input is empty: send at least one tf.Example")
    return [example.SerializeToString() for example in examples]


def check_method(
    servable: Servable, signature: str, sigdef: meta_graph_pb2.SignatureDef, method: str
) -> str:
    """Returns the signature's single string input name, or raises INVALID_ARGUMENT."""
    if sigdef.method_name != method:
        raise InvalidArgument(
            f"signature {signature!r} of model {servable.model!r} version {servable.version} "
            f"is not a {_KIND[method]} signature (its method_name is {sigdef.method_name!r})"
        )
    strings = [name for name, info in sigdef.inputs.items() if info.dtype == types_pb2.DT_STRING]
    if len(sigdef.inputs) != 1 or len(strings) != 1:
        raise InvalidArgument(
            f"{_KIND[method]} signature {signature!r} must have exactly one string input, "
            f"has: {', '.join(sorted(sigdef.inputs)) or 'none'}"
        )
    return str(strings[0])


def run(
    servable: Servable, signature: str, method: str, examples: list[bytes]
) -> classification_pb2.ClassificationResult | regression_pb2.RegressionResult:
    """Runs a classification or regression signature (blocking) and shapes TF Serving's result."""
    sigdef = servable.signature(signature)
    input_name = check_method(servable, signature, sigdef, method)
    feeds = {input_name: np.array(examples, dtype=object)}
    if method == REGRESS_METHOD:
        if "outputs" not in sigdef.outputs:
            raise InvalidArgument(f"regression signature {signature!r} has no output 'outputs'")
        values = servable.run(signature, feeds, ["outputs"])["outputs"]
        return _regression(values, len(examples))
    wanted = [name for name in ("classes", "scores") if name in sigdef.outputs]
    if not wanted:
        raise InvalidArgument(
            f"classification signature {signature!r} has neither 'classes' nor 'scores' outputs"
        )
    outputs = servable.run(signature, feeds, wanted)
    return _classification(outputs.get("classes"), outputs.get("scores"), len(examples))


def _regression(values: np.ndarray, batch: int) -> regression_pb2.RegressionResult:
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.shape != (batch,):
        raise InvalidArgument(
            f"regression output 'outputs' has shape {list(values.shape)}; expected [{batch}] "
            f"or [{batch}, 1]"
        )
    result = regression_pb2.RegressionResult()
    for value in values:
        result.regressions.add(value=float(value))
    return result


def _classification(
    classes: np.ndarray | None, scores: np.ndarray | None, batch: int
) -> classification_pb2.ClassificationResult:
    for name, array in (("classes", classes), ("scores", scores)):
        if array is not None and (array.ndim != 2 or array.shape[0] != batch):
            raise InvalidArgument(
                f"classification output {name!r} has shape {list(array.shape)}; "
                f"expected [{batch}, k]"
            )
    if classes is not None and scores is not None and classes.shape != scores.shape:
        raise InvalidArgument(
            f"classification outputs disagree: classes {list(classes.shape)}, "
            f"scores {list(scores.shape)}"
        )
    reference = classes if classes is not None else scores
    assert reference is not None  # check_method guarantees one of the two
    width = reference.shape[1]
    result = classification_pb2.ClassificationResult()
    for row in range(batch):
        entry = result.classifications.add()
        for col in range(width):
            one = entry.classes.add()
            if classes is not None:
                label = classes[row, col]
                one.label = label.decode() if isinstance(label, bytes) else str(label)
            if scores is not None:
                one.score = float(scores[row, col])
    return result

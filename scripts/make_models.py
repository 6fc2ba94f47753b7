#!/usr/bin/env python3
"""Writes the example SavedModels with TensorFlow: ``make_models.py --out DIR``.

* ``DIR/half_plus_two/1`` and ``/2``: a ``tf.Module`` with variables; ``y = 0.5 * x + 2`` (v1) and
  ``y = 0.5 * x + 3`` (v2). Signature ``serving_default``: ``x`` float32 [-1] -> ``y`` float32 [-1].
* ``DIR/iris/1``: a linear classifier with fixed weights. Signature ``serving_default``: four
  float32 [-1] inputs (``sepal_length``, ``sepal_width``, ``petal_length``, ``petal_width``) ->
  ``class_ids`` int64 [-1, 1] and ``probabilities`` float32 [-1, 3].
* ``DIR/total/1``: ``total = sum(x)``, ``x`` float32 [-1] -> ``total`` float32 [] (a scalar): a
  model whose output does not follow the batch dimension, so server-side batching must not join
  its calls.
* ``DIR/single/1``: ``y = 2 x`` for exactly one value, ``x`` float32 [1] -> ``y`` float32 [1]: a
  model that takes one row per call, so the backend refuses any batch of its calls.
* ``DIR/half_plus_two_inf/1``: the Inferentia layout (``saved_model.pb`` only, no ``variables/``):
  a graph of constants written by the TF1 ``SavedModelBuilder``, ``y = 0.5 * x + 2``. Besides
  ``serving_default`` it carries TF Serving's classic ``classify_x_to_y`` and ``regress_x_to_y``
  signatures, which read ``x`` from serialized ``tf.Example`` protos.
* ``DIR/dtypes/1``: the identity for every dtype ``modelmux.v1.Tensor`` carries, one input per
  dtype, each of unknown rank (``float32``, ``float64``, ``float16``, ``int8``, ``int16``,
  ``int32``, ``int64``, ``uint8``, ``uint16``, ``uint32``, ``uint64``, ``bool``, ``string``), each
  output named like its input: what the clients' round-trip tests call.
* ``DIR/python/fahrenheit/1`` and ``DIR/python/kelvin/1``: not TensorFlow models but the linear
  models of the ``python-handler`` example (examples/python-handler/): ``model.json`` with the
  input names, one weight per input, a bias and the output name.

Every version is written into a staging folder next to its destination and renamed into place, so
a backend polling ``DIR`` never sees a half-written version. Existing versions are rewritten.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # after TF_CPP_MIN_LOG_LEVEL is set

tf.get_logger().setLevel("ERROR")

IRIS_FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
# Rows follow IRIS_FEATURES, columns are the classes setosa, versicolor, virginica. Only the petal
# measurements matter: class 0 below petal_length + petal_width = 3.5, class 2 above 6.6.
IRIS_WEIGHTS = (
    (0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0),
    (-4.0, 0.0, 4.0),
    (-4.0, 0.0, 4.0),
)
IRIS_BIASES = (14.0, 0.0, -26.4)
# The python-handler example's models: output = bias + sum(weight * input).
LINEAR_MODELS = {
    "fahrenheit": {"inputs": ["celsius"], "weights": [1.8], "bias": 32.0, "output": "fahrenheit"},
    "kelvin": {"inputs": ["celsius"], "weights": [1.0], "bias": 273.15, "output": "kelvin"},
}


class HalfPlus(tf.Module):
    """``y = a * x + b`` with ``a`` and ``b`` stored as variables."""

    def __init__(self, offset: float) -> None:
        super().__init__(name="half_plus")
        self.a = tf.Variable(0.5, dtype=tf.float32, name="a")
        self.b = tf.Variable(offset, dtype=tf.float32, name="b")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": self.a * x + self.b}


class Iris(tf.Module):
    """Softmax over a fixed linear map of the four measurements."""

    def __init__(self) -> None:
        super().__init__(name="iris")
        self.w = tf.Variable(IRIS_WEIGHTS, dtype=tf.float32, name="weights")
        self.b = tf.Variable(IRIS_BIASES, dtype=tf.float32, name="biases")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name=n) for n in IRIS_FEATURES])
    def serve(
        self,
        sepal_length: tf.Tensor,
        sepal_width: tf.Tensor,
        petal_length: tf.Tensor,
        petal_width: tf.Tensor,
    ) -> dict[str, tf.Tensor]:
        features = tf.stack([sepal_length, sepal_width, petal_length, petal_width], axis=1)
        logits = tf.matmul(features, self.w) + self.b
        class_ids = tf.expand_dims(tf.argmax(logits, axis=1, output_type=tf.int64), axis=1)
        return {"class_ids": class_ids, "probabilities": tf.nn.softmax(logits)}


class Total(tf.Module):
    """The sum of all of ``x``: one scalar however many rows come in."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"total": tf.reduce_sum(x)}


class Single(tf.Module):
    """Twice its one input value: the signature fixes the first dimension at 1."""

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="x")])
    def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"y": 2.0 * x}


# Input (and output) name -> dtype of the dtypes model: every dtype modelmux.v1.Tensor carries.
DTYPES = {
    "float32": tf.float32,
    "float64": tf.float64,
    "float16": tf.float16,
    "int8": tf.int8,
    "int16": tf.int16,
    "int32": tf.int32,
    "int64": tf.int64,
    "uint8": tf.uint8,
    "uint16": tf.uint16,
    "uint32": tf.uint32,
    "uint64": tf.uint64,
    "bool": tf.bool,
    "string": tf.string,
}


class Dtypes(tf.Module):
    """Returns each input unchanged under its own name, whatever its shape."""

    @tf.function(input_signature=[tf.TensorSpec(None, dt, name=n) for n, dt in DTYPES.items()])
    def serve(self, *tensors: tf.Tensor) -> dict[str, tf.Tensor]:
        return {name: tf.identity(t) for name, t in zip(DTYPES, tensors, strict=True)}


def save_module(module: HalfPlus | Iris | Total | Single | Dtypes, dest: Path) -> None:
    tf.saved_model.save(module, str(dest), signatures={"serving_default": module.serve})


def save_inferentia_half_plus_two(dest: Path) -> None:
    """A TF1 graph of constants; the builder's empty ``variables/`` is removed afterwards."""
    v1 = tf.compat.v1
    with tf.Graph().as_default(), v1.Session() as session:
        x = v1.placeholder(tf.float32, shape=[None], name="x")
        y = tf.add(tf.multiply(x, 0.5), 2.0, name="y")
        serialized = v1.placeholder(tf.string, shape=[None], name="tf_example")
        parsed = v1.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})
        y_from_example = tf.add(tf.multiply(parsed["x"], 0.5), 2.0, name="y_from_example")
        info = v1.saved_model.utils.build_tensor_info
        signatures = {
            "serving_default": v1.saved_model.signature_def_utils.predict_signature_def(
                inputs={"x": x}, outputs={"y": y}
            ),
            "classify_x_to_y": v1.saved_model.signature_def_utils.build_signature_def(
                inputs={"inputs": info(serialized)},
                outputs={"scores": info(y_from_example)},
                method_name=v1.saved_model.signature_constants.CLASSIFY_METHOD_NAME,
            ),
            "regress_x_to_y": v1.saved_model.signature_def_utils.build_signature_def(
                inputs={"inputs": info(serialized)},
                outputs={"outputs": info(y_from_example)},
                method_name=v1.saved_model.signature_constants.REGRESS_METHOD_NAME,
            ),
        }
        builder = v1.saved_model.Builder(str(dest))
        builder.add_meta_graph_and_variables(
            session, [v1.saved_model.tag_constants.SERVING], signature_def_map=signatures
        )
        builder.save()
    variables = dest / "variables"
    if variables.exists():
        if any(variables.iterdir()):
            raise RuntimeError(f"{variables} is not empty; the graph must hold constants only")
        variables.rmdir()


def save_linear(spec: Mapping[str, object], dest: Path) -> None:
    dest.mkdir()
    (dest / "model.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def write_version(out: Path, model: str, version: int, save: Callable[[Path], None]) -> Path:
    """Saves into a staging folder beside the destination, then renames it into place."""
    model_dir = out / model
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / str(version)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        save(staging / "model")
        if final.exists():
            old = staging / "old"
            final.rename(old)
        (staging / "model").rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write <model>/<version>/ into")
    args = parser.parse_args(argv)
    out = Path(args.out)
    jobs: list[tuple[str, int, Callable[[Path], None]]] = [
        ("half_plus_two", 1, lambda dest: save_module(HalfPlus(2.0), dest)),
        ("half_plus_two", 2, lambda dest: save_module(HalfPlus(3.0), dest)),
        ("iris", 1, lambda dest: save_module(Iris(), dest)),
        ("total", 1, lambda dest: save_module(Total(), dest)),
        ("single", 1, lambda dest: save_module(Single(), dest)),
        ("half_plus_two_inf", 1, save_inferentia_half_plus_two),
        ("dtypes", 1, lambda dest: save_module(Dtypes(), dest)),
    ]
    for name, spec in LINEAR_MODELS.items():
        jobs.append((f"python/{name}", 1, functools.partial(save_linear, spec)))
    for model, version, save in jobs:
        final = write_version(out, model, version, save)
        print(f"wrote {model} version {version} to {final}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

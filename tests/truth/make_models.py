"""Write real models and TensorBoard logs with the real frameworks, and record what they say.

    python tests/truth/make_models.py OUT

Runs in the ground-truth venv (tests/truth/requirements.txt), never in the project's own.
Each model goes into its own unit directory below OUT; OUT/truth.json maps the unit's name
to the facts the framework reports about it (signatures, `tf.train.list_variables`,
`count_params()`, `num_parameters()`, initializer sizes, the last scalar of each tag). The
test (tests/test_describe_truth.py) then describes the same units with modelwatch.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf
import torch

keras = tf.keras


def tf_dtype(dtype: Any) -> str:
    return str(tf.as_dtype(dtype).name).replace("half", "float16")


def shape_of(shape: Any) -> list[int | None] | None:
    return None if shape.rank is None else [None if d is None else int(d) for d in shape]


def keras_model() -> Any:
    tf.random.set_seed(1)
    inputs = keras.Input(shape=(6,), name="features")
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    hidden = keras.layers.BatchNormalization(name="norm")(hidden)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(hidden)
    model = keras.Model(inputs, outputs, name="classifier")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def train(model: Any, logdir: str | None = None) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, size=(64,))
    callbacks = [keras.callbacks.TensorBoard(logdir)] if logdir else []
    model.fit(x, y, epochs=3, batch_size=16, validation_split=0.25, verbose=0, callbacks=callbacks)


def saved_model(out: str, model: Any) -> dict[str, Any]:
    path = os.path.join(out, "saved_model")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    signatures = {}
    for name, function in loaded.signatures.items():
        _, kwargs = function.structured_input_signature
        signatures[name] = {
            "inputs": {k: [tf_dtype(v.dtype), shape_of(v.shape)] for k, v in kwargs.items()},
            "outputs": {
                k: [tf_dtype(v.dtype), shape_of(v.shape)]
                for k, v in function.structured_outputs.items()
            },
        }
    variables = tf.train.list_variables(os.path.join(path, "variables", "variables"))
    return {
        "tensorflow_version": tf.__version__,
        "signatures": signatures,
        "variables": {name: list(shape) for name, shape in variables},
        "parameter_count": int(model.count_params()),
    }


def tf_module(out: str) -> dict[str, Any]:
    """A SavedModel of a plain tf.Module with an explicit signature (no Keras)."""

    class Affine(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.ones([5, 2]), name="w")
            self.b = tf.Variable(tf.zeros([2]), name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.float32, name="x")])
        def __call__(self, x: Any) -> Any:
            return {"y": tf.matmul(x, self.w) + self.b}

    module = Affine()
    path = os.path.join(out, "saved_model")
    tf.saved_model.save(module, path, signatures=module.__call__)
    variables = tf.train.list_variables(os.path.join(path, "variables", "variables"))
    count = sum(int(np.prod(v.shape)) for v in module.trainable_variables)
    return {
        "variables": {name: list(shape) for name, shape in variables},
        "parameter_count": count,
        "signatures": {"serving_default": {"inputs": {"x": ["float32", [None, 5]]}}},
    }


def checkpoint(out: str, model: Any) -> dict[str, Any]:
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    prefix = ckpt.save(os.path.join(out, "ckpt"))
    variables = tf.train.list_variables(prefix)
    return {
        "prefix": os.path.basename(prefix),
        "variables": {name: list(shape) for name, shape in variables},
        "parameter_count": int(model.count_params()),
    }


def keras_file(out: str, model: Any) -> dict[str, Any]:
    model.save(os.path.join(out, "model.keras"))
    return {
        "keras_version": keras.__version__,
        "class_name": type(model).__name__,
        "layer_count": len(model.layers),
        "loss": model.loss,
        "optimizer": type(model.optimizer).__name__,
        "parameter_count": int(model.count_params()),
    }


def main(out: str) -> None:
    truth: dict[str, Any] = {"versions": {"tensorflow": tf.__version__, "torch": torch.__version__}}

    def unit(name: str) -> str:
        path = os.path.join(out, name)
        os.makedirs(path)
        return path

    model = keras_model()
    train(model, os.path.join(unit("keras_logs"), "logs"))
    truth["saved_model_keras"] = saved_model(unit("saved_model_keras"), model)
    truth["saved_model_module"] = tf_module(unit("saved_model_module"))
    truth["tf_checkpoint"] = checkpoint(unit("tf_checkpoint"), model)
    truth["keras"] = keras_file(unit("keras"), model)
    import truth_events
    import truth_torch

    truth.update(truth_events.write_all(out, unit))
    truth.update(truth_torch.write_all(out, unit))
    with open(os.path.join(out, "truth.json"), "w") as stream:
        json.dump(truth, stream, indent=1, sort_keys=True, default=str)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1])

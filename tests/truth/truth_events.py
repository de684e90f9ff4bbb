"""TensorBoard logs written by TF2 summaries, Keras, tensorboardX; the last scalars per tag
as TensorFlow's own event reader sees them (`tf.compat.v1.train.summary_iterator`)."""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable
from typing import Any

import tensorflow as tf


def last_scalars(unit: str) -> dict[str, float]:
    """name -> last value by step of every scalar in the unit's event files, read by TF."""
    last: dict[str, tuple[int, float]] = {}
    pattern = os.path.join(unit, "**", "events.out.tfevents.*")
    for path in sorted(glob.glob(pattern, recursive=True)):
        run = os.path.relpath(os.path.dirname(path), unit)
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number = float(value.simple_value)
                elif kind == "tensor" and not value.tensor.tensor_shape.dim:
                    array = tf.make_ndarray(value.tensor)
                    if array.dtype.kind not in "fiu":
                        continue
                    number = float(array)
                else:
                    continue
                name = value.tag if run == "." else f"{run}/{value.tag}"
                if name not in last or event.step >= last[name][0]:
                    last[name] = (event.step, number)
    return {name: v for name, (_, v) in sorted(last.items()) if math.isfinite(v)}


def tf2_summaries(unit: str) -> None:
    for run, scale in (("train", 1.0), ("validation", 0.5)):
        writer = tf.summary.create_file_writer(os.path.join(unit, run))
        with writer.as_default():
            for step in range(5):
                tf.summary.scalar("loss", scale / (step + 1), step=step)
                tf.summary.scalar("steps_done", tf.constant(step, tf.int64), step=step)
                tf.summary.histogram("weights", tf.random.normal([10]), step=step)
                tf.summary.text("note", "not a scalar", step=step)
            tf.summary.scalar("loss", float("nan"), step=9)  # a NaN last value is left out
            tf.summary.scalar("lr", 0.1, step=3)
            tf.summary.scalar("lr", 0.05, step=1)  # written later, earlier step: not last
        writer.close()


def tensorboardx_logs(unit: str) -> None:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(logdir=unit)
    for step in range(4):
        writer.add_scalar("accuracy", 0.2 * step, step)
        writer.add_scalars("pair", {"a": step, "b": -step}, step)
    writer.close()


def write_all(out: str, unit: Callable[[str], str]) -> dict[str, Any]:
    truth = {}
    keras_logs = os.path.join(out, "keras_logs")
    truth["keras_logs"] = {"scalars": last_scalars(keras_logs)}
    tf2 = unit("tf2_logs")
    tf2_summaries(tf2)
    truth["tf2_logs"] = {"scalars": last_scalars(tf2)}
    tbx = unit("tensorboardx_logs")
    tensorboardx_logs(tbx)
    truth["tensorboardx_logs"] = {"scalars": last_scalars(tbx)}
    return truth

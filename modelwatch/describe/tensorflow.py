"""SavedModels and TensorFlow checkpoints, described from `saved_model.pb` and `.index` files.

`saved_model.pb` (tensorflow/core/protobuf/saved_model.proto): SavedModel
{schema_version = 1, meta_graphs = 2}; MetaGraphDef {meta_info_def = 1 {tags = 4,
tensorflow_version = 5, tensorflow_git_version = 6}, graph_def = 2 (skipped, the bulk of the
file), signature_def = 5 (map)}; SignatureDef {inputs = 1, outputs = 2 (maps of TensorInfo
{name = 1, dtype = 2, tensor_shape = 3}), method_name = 3}.

Parameter count of a checkpoint: the elements of its numeric variables that belong to the
model, as its object graph tells (`tfgraph`); a TF1 checkpoint without one counts every
numeric variable but `global_step`.
"""

from __future__ import annotations

import posixpath
from typing import Any

from modelwatch import tfstate
from modelwatch.describe.protowire import VARINT, Field, Region
from modelwatch.describe.source import DescribeError, Source, malformed, too_large
from modelwatch.describe.tensors import Tensors
from modelwatch.describe.tfgraph import parameter_keys
from modelwatch.describe.tftable import Bundle, read_bundle, tensor_meta, variables

_NOT_PARAMETERS = {"string", "resource", "variant", "invalid"}
_TF1_BOOKKEEPING = {"global_step"}
MAX_META_GRAPHS = 16  # TF writes one per tag set; a handful at most
_MAX_TAGS = 64
_MAX_TEXT = 1024  # characters of a tag, version or tensor name


def describe_saved_model(source: Source) -> dict[str, Any]:
    """Meta graphs (tags, TF version, signatures) and the variables of the first SavedModel."""
    names = ("saved_model.pb", "saved_model.pbtxt")
    path = source.first(lambda p: posixpath.basename(p) in names, "saved_model.pb")
    if path.endswith(".pbtxt"):
        raise DescribeError("describe_unsupported", path, "text SavedModels are not described")
    out: dict[str, Any] = {"path": path}
    with source.open(path) as blob:
        for field in Region.whole(blob).fields():
            if field.number == 1 and field.wire == VARINT:
                out["saved_model_schema_version"] = field.value
            elif field.number == 2:
                graphs = out.setdefault("meta_graphs", [])
                if len(graphs) >= MAX_META_GRAPHS:
                    raise too_large(path, f"more than {MAX_META_GRAPHS} meta graphs")
                graphs.append(_meta_graph(field.message(), source.limits.listed))
    index = posixpath.join(posixpath.dirname(path), "variables", "variables.index")
    if index in source.files:
        try:
            out.update(_variables(source, index))
        except DescribeError as exc:  # the signatures stand without the variables
            out["error"] = exc.as_error()
    return out


def describe_checkpoint(source: Source) -> dict[str, Any]:
    """The variables of the checkpoint the first `checkpoint` file names."""
    states = source.paths(lambda p: posixpath.basename(p) == "checkpoint")
    for state in states:
        prefix = checkpoint_prefix(source.read_small(state, 1 << 20), state)
        index = f"{prefix}.index"
        if index in source.files:
            return {"checkpoint": prefix, **_variables(source, index)}
    raise malformed(states[0] if states else "checkpoint", "names no .index in the unit")


def checkpoint_prefix(text: bytes, name: str) -> str:
    """The prefix `model_checkpoint_path` names, relative to the unit (TF writes an absolute
    path when it saved to one; the files are beside `checkpoint` whatever it says)."""
    try:
        target = tfstate.checkpoint_prefix(text)
    except ValueError as exc:
        raise malformed(name, f"not a CheckpointState: {exc}") from None
    if posixpath.isabs(target) or ".." in target.split("/"):
        target = posixpath.basename(target)
    return posixpath.normpath(posixpath.join(posixpath.dirname(name), target))


def _meta_graph(region: Region, listed: int) -> dict[str, Any]:
    """Tags, TF version and signatures; at most `listed` signatures, and `listed` inputs and
    outputs listed over all of them (the others are counted: `input_count`...)."""
    graph: dict[str, Any] = {"tags": [], "signatures": []}
    budget = [listed]
    for field in region.fields():
        if field.number == 1:
            for info in field.message().fields():
                if info.number == 4 and len(graph["tags"]) < _MAX_TAGS:
                    graph["tags"].append(info.text(_MAX_TEXT))
                elif info.number == 5:
                    graph["tensorflow_version"] = info.text(_MAX_TEXT)
                elif info.number == 6:
                    graph["tensorflow_git_version"] = info.text(_MAX_TEXT)
        elif field.number == 5:
            key, value = _map_entry(field)
            # `__saved_model_init_op` and the like are TF's own, not the model's signatures
            if value is not None and not key.startswith("__"):
                if len(graph["signatures"]) >= listed:
                    raise too_large(region.blob.name, f"more than {listed} signatures")
                graph["signatures"].append({"name": key, **_signature(value, budget)})
    graph["tags"].sort()
    graph["signatures"].sort(key=lambda s: s["name"])
    return graph


def _map_entry(field: Field) -> tuple[str, Region | None]:
    key, value = "", None
    for part in field.message().fields():
        if part.number == 1:
            key = part.text(_MAX_TEXT)
        elif part.number == 2:
            value = part.message()
    return key, value


def _signature(region: Region, budget: list[int]) -> dict[str, Any]:
    """One SignatureDef; `budget[0]`: how many more inputs and outputs may be listed."""
    out: dict[str, Any] = {"method_name": "", "inputs": [], "outputs": []}
    counts = {"inputs": 0, "outputs": 0}
    for field in region.fields():
        if field.number in (1, 2):
            key, value = _map_entry(field)
            if value is not None:
                side = "inputs" if field.number == 1 else "outputs"
                counts[side] += 1
                if budget[0] > 0:
                    budget[0] -= 1
                    out[side].append({"name": key, **_tensor_info(value)})
        elif field.number == 3:
            out["method_name"] = field.text(_MAX_TEXT)
    for side in ("inputs", "outputs"):
        out[side].sort(key=lambda t: t["name"])
        if counts[side] > len(out[side]):
            out[f"{side[:-1]}_count"] = counts[side]
            out[f"{side}_truncated"] = True
    return out


def _tensor_info(region: Region) -> dict[str, Any]:
    tensor = ""
    for field in region.fields():
        if field.number == 1:
            tensor = field.text(_MAX_TEXT)
    dtype, shape = tensor_meta(region.fields(), dtype_field=2, shape_field=3)
    return {"tensor": tensor, "dtype": dtype, "shape": shape}


def _variables(source: Source, index: str) -> dict[str, Any]:
    with source.open(index) as blob:
        bundle: Bundle = read_bundle(blob, source.limits.index_bytes)
        keys = parameter_keys(source, index[: -len(".index")], bundle)
        tensors = Tensors(source.limits.listed)
        for var in variables(blob):
            model = var.name in keys if keys is not None else var.name not in _TF1_BOOKKEEPING
            counted = model and var.dtype not in _NOT_PARAMETERS
            tensors.add(var.name, var.dtype, var.shape, count=counted)
    return {"shard_count": bundle.num_shards, **tensors.summary("variables")}

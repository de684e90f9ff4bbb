"""ONNX models, walked with `protowire` instead of loaded with `onnx`.

ModelProto {ir_version = 1, producer_name = 2, producer_version = 3, domain = 4,
model_version = 5, graph = 7, opset_import = 8 [{domain = 1, version = 2}],
metadata_props = 14 [{key = 1, value = 2}]}; GraphProto {node = 1, name = 2,
initializer = 5 [TensorProto {dims = 1, data_type = 2, name = 8}], input = 11, output = 12};
ValueInfoProto {name = 1, type = 2 {tensor_type = 1 {elem_type = 1, shape = 2 {dim = 1
[{dim_value = 1, dim_param = 2}]}}}}. Initializer bytes (`raw_data`, or external data files)
are skipped. Graph inputs that are initializers (IR < 4 lists them as inputs) are not model
inputs. The parameter count is the elements of every initializer.

Memory is bounded whatever the graph holds: the first `listed` inputs and outputs are kept
(the others counted), initializers are listed by `Tensors` and remembered by digest.
"""

from __future__ import annotations

import hashlib
from typing import Any

from modelwatch.describe.protowire import VARINT, Field, Region, packed_varints, signed64
from modelwatch.describe.source import Source, too_large
from modelwatch.describe.tensors import MAX_RANK, ONNX_DTYPES, Dim, Tensors

_MAX_TEXT = 1 << 12
_MAX_DIM_NAME = 256
_MAX_DIMS_BYTES = 10 * MAX_RANK  # packed dims: at most 10 bytes each
_MAX_NAMES = 200_000


def describe_onnx(source: Source) -> dict[str, Any]:
    """IR version, producer, opsets, graph inputs/outputs, parameter count, metadata_props."""
    path = source.first(lambda p: p.endswith(".onnx"), ".onnx file")
    out: dict[str, Any] = {"path": path, "opsets": {}, "metadata_props": {}}
    with source.open(path) as blob:
        for field in Region.whole(blob).fields():
            _model_field(field, out, source)
    out["opsets"] = dict(sorted(out["opsets"].items()))
    out["metadata_props"] = dict(sorted(out["metadata_props"].items()))
    return out


_TEXT = {2: "producer_name", 3: "producer_version", 4: "domain"}


def _model_field(field: Field, out: dict[str, Any], source: Source) -> None:
    if field.number == 1 and field.wire == VARINT:
        out["ir_version"] = field.signed()
    elif field.number in _TEXT and field.region is not None:
        out[_TEXT[field.number]] = field.text(1 << 12)
    elif field.number == 5 and field.wire == VARINT:
        out["model_version"] = field.signed()
    elif field.number == 8:
        domain, version = _pair(field.message(), text_value=False)
        out["opsets"][domain or "ai.onnx"] = version
    elif field.number == 14:
        key, value = _pair(field.message(), text_value=True)
        out["metadata_props"][key] = value
    elif field.number == 7:
        out.update(_graph(field.message(), source))


def _pair(region: Region, *, text_value: bool) -> tuple[str, Any]:
    key: str = ""
    value: Any = "" if text_value else 0
    for field in region.fields():
        if field.number == 1:
            key = field.text(1 << 12)
        elif field.number == 2:
            value = field.text(1 << 16) if text_value else field.signed()
    return key, value


def _graph(region: Region, source: Source) -> dict[str, Any]:
    listed = source.limits.listed
    tensors = Tensors(listed)
    initializers = _Names()
    inputs: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    counts = [0, 0]  # inputs (not initializers, as far as known), outputs
    nodes, name = 0, ""
    for field in region.fields():
        if field.number == 1:
            nodes += 1
        elif field.number == 2:
            name = field.text(_MAX_TEXT)
        elif field.number == 5:
            tensor_name, dtype, dims = _initializer(field.message())
            initializers.add(tensor_name)
            tensors.add(tensor_name, dtype, dims)
        elif field.number in (11, 12):
            side = field.number - 11
            kept = inputs if side == 0 else outputs
            full = len(kept) >= listed  # then only its name matters, to be counted
            info = _value_info(field.message(), name_only=full)
            if side == 0 and info["name"] in initializers:
                continue
            counts[side] += 1
            if not full:
                kept.append(info)
    # IR < 4 lists initializers as inputs too; TF and torch write initializers first, but a
    # writer may not: those listed before their initializer are dropped here.
    shown = [i for i in inputs if i["name"] not in initializers]
    out = {
        "graph_name": name,
        "node_count": nodes,
        "inputs": shown,
        "outputs": outputs,
        **tensors.summary("initializers"),
    }
    for side, label in enumerate(("inputs", "outputs")):
        if counts[side] > listed:
            out[f"{label[:-1]}_count"] = counts[side]
            out[f"{label}_truncated"] = True
    return out


class _Names:
    """Initializer names, remembered by a 64-bit digest (at most `_MAX_NAMES`: a model with
    more keeps the first ones), so a million 64 KiB names cost no more than their count."""

    def __init__(self) -> None:
        self._digests: set[bytes] = set()

    def add(self, name: str) -> None:
        if len(self._digests) < _MAX_NAMES:
            self._digests.add(_digest(name))

    def __contains__(self, name: object) -> bool:
        return bool(self._digests) and isinstance(name, str) and _digest(name) in self._digests


def _digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _initializer(region: Region) -> tuple[str, str, list[Dim]]:
    name, dtype = "", "undefined"
    dims: list[int] = []
    for field in region.fields():
        if field.number == 1:
            dims.extend(signed64(v) for v in packed_varints(field, _MAX_DIMS_BYTES))
            if len(dims) > MAX_RANK:
                raise too_large(region.blob.name, f"a shape of more than {MAX_RANK} dimensions")
        elif field.number == 2 and field.wire == VARINT:
            dtype = ONNX_DTYPES.get(field.value, f"unknown({field.value})")
        elif field.number == 8:
            name = field.text(1 << 16)
    return name, dtype, [d if d >= 0 else None for d in dims]


def _value_info(region: Region, *, name_only: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"name": "", "dtype": None, "shape": None}
    for field in region.fields():
        if field.number == 1:
            info["name"] = field.text(1 << 16)
        elif field.number == 2 and not name_only:
            for kind in field.message().fields():
                if kind.number == 1:  # tensor_type; sequences and maps keep dtype None
                    info["dtype"], info["shape"] = _tensor_type(kind.message())
    return info


def _tensor_type(region: Region) -> tuple[str, list[Dim] | None]:
    dtype: str = "undefined"
    shape: list[Dim] | None = None
    dims: list[Dim]
    for field in region.fields():
        if field.number == 1 and field.wire == VARINT:
            dtype = ONNX_DTYPES.get(field.value, f"unknown({field.value})")
        elif field.number == 2:
            shape = dims = []
            for dim in field.message().fields():
                if dim.number == 1:
                    if len(dims) >= MAX_RANK:
                        raise too_large(region.blob.name, f"more than {MAX_RANK} dimensions")
                    dims.append(_dim(dim.message()))
    return dtype, shape


def _dim(region: Region) -> Dim:
    for field in region.fields():
        if field.number == 1 and field.wire == VARINT:
            return field.signed()
        if field.number == 2:
            return field.text(_MAX_DIM_NAME)
    return None

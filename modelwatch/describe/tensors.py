"""Tensors as every description lists them: one dtype vocabulary, counts, a capped listing.

Each format names its dtypes its own way (TensorFlow's `DT_HALF` enum 19, ONNX's 10,
safetensors' `F16`, torch's `HalfStorage`); descriptions use one vocabulary (`float16`), so a
consumer compares formats without tables of its own. `Tensors` collects (name, dtype, shape)
and gives the description's `tensor_count`, `parameter_count` (elements of every tensor
counted), `dtypes` (elements per dtype) and `tensors` (the first `listed` by name).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# A dimension is an int, a symbolic name (ONNX `dim_param`), or None (unknown).
Dim = int | str | None
MAX_NAME = 1024  # characters of a tensor name kept in a listing
MAX_RANK = 256  # dimensions of one shape (TensorFlow allows 254)

_COMMON = (  # noqa: SIM905 - one line of names reads better than a column of 33
    "float32 float64 int32 uint8 int16 int8 string complex64 int64 bool qint8 quint8 qint32 "
    "bfloat16 qint16 quint16 uint16 complex128 float16 resource variant uint32 uint64 "
    "float8_e5m2 float8_e4m3fn float8_e4m3fnuz float8_e4m3b11fnuz float8_e5m2fnuz int4 uint4 "
    "int2 uint2 float4_e2m1fn"
).split()
# tensorflow/core/framework/types.proto: DT_FLOAT = 1 ... in the order above.
TF_DTYPES: dict[int, str] = {i + 1: name for i, name in enumerate(_COMMON)}

# onnx/onnx.proto TensorProto.DataType
ONNX_DTYPES: dict[int, str] = dict(
    enumerate(
        (  # noqa: SIM905 - as above
            "undefined float32 uint8 int8 uint16 int16 int32 int64 string bool float16 float64 "
            "uint32 uint64 complex64 complex128 bfloat16 float8_e4m3fn float8_e4m3fnuz "
            "float8_e5m2 float8_e5m2fnuz uint4 int4 float4_e2m1fn float8_e8m0 uint2 int2 "
            "float6_e2m3 float6_e3m2"
        ).split()
    )
)

# The safetensors format's dtype strings.
SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0",
    "F6_E2M3": "float6_e2m3",
    "F6_E3M2": "float6_e3m2",
    "F4": "float4_e2m1fn",
    "I4": "int4",
    "U4": "uint4",
}

# torch's legacy typed-storage class names (`torch.FloatStorage`) in torch.save pickles.
TORCH_STORAGES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

# torch dtype attribute names (`torch.float32`, `torch.half`) -> the common vocabulary.
TORCH_DTYPES: dict[str, str] = {
    **{name: name for name in _COMMON},
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "float8_e8m0fnu": "float8_e8m0",
    "float4_e2m1fn_x2": "float4_e2m1fn_x2",
    "quint4x2": "quint4x2",
    "quint2x4": "quint2x4",
}


def numel(shape: Sequence[Dim] | None) -> int | None:
    """Elements of a tensor of `shape`; None when a dimension is unknown or symbolic."""
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return math.prod(d for d in shape if isinstance(d, int))


class Firsts:
    """The `listed` first items by key, whatever how many are added: memory is at most twice
    `listed` items between two trims. `count` is how many were added."""

    def __init__(self, listed: int) -> None:
        self.listed = listed
        self.count = 0
        self._kept: list[tuple[Any, Any]] = []

    def add(self, key: Any, item: Any) -> None:
        self.count += 1
        self._kept.append((key, item))
        if len(self._kept) >= 2 * self.listed + 2:
            self._trim()

    def _trim(self) -> None:
        self._kept.sort(key=lambda kept: kept[0])
        del self._kept[self.listed :]

    def items(self) -> list[Any]:
        """The first `listed` items, in key order."""
        self._trim()
        return [item for _, item in self._kept]

    @property
    def truncated(self) -> bool:
        return self.count > self.listed


class Tensors:
    """The tensors of one description, collected in any order, reported deterministically.

    Memory is bounded whatever the count: only the `listed` first by (name, dtype, shape) are
    kept (`Firsts`), names cut to `MAX_NAME` characters; every tensor still counts in
    `tensor_count`, `parameter_count` and `dtypes`.
    """

    def __init__(self, listed: int) -> None:
        self._firsts = Firsts(listed)
        self.parameters = 0
        self.by_dtype: dict[str, int] = {}

    def add(self, name: str, dtype: str, shape: list[Dim] | None, *, count: bool = True) -> None:
        """One tensor; `count` False lists it without adding to the parameter count."""
        name = name[:MAX_NAME]
        self._firsts.add((name, dtype, str(shape)), {"name": name, "dtype": dtype, "shape": shape})
        elements = numel(shape)
        if count and elements is not None:
            self.count(dtype, elements)

    def count(self, dtype: str, elements: int) -> None:
        """Add `elements` of `dtype` to the parameter count (for tensors added uncounted)."""
        self.parameters += elements
        self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + elements

    def __len__(self) -> int:
        return self._firsts.count

    def summary(self, label: str = "tensors") -> dict[str, Any]:
        """`<label>_count`, `parameter_count`, `dtypes` and the first `listed` `<label>`."""
        out: dict[str, Any] = {
            f"{label[:-1]}_count": self._firsts.count,
            "parameter_count": self.parameters,
            "dtypes": dict(sorted(self.by_dtype.items())),
            label: self._firsts.items(),
        }
        if self._firsts.truncated:
            out[f"{label}_truncated"] = True
        return out

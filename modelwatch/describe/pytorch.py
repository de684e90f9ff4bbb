"""`torch.save` zips and torch.distributed.checkpoint directories, read without torch.

A `torch.save` file is a zip (`<archive>/data.pkl`, `<archive>/data/<storage key>`, ...); the
pickle is interpreted by `pickles` (nothing imported, nothing called). Tensors are found
anywhere in what it holds (a state dict, a checkpoint dict, a whole pickled module), named by
their path of keys (`model/fc.weight`). The parameter count covers each tensor once (views of
one storage region counted once, as `model.parameters()` counts tied weights once), except
those below a key naming an optimizer or scheduler (`optimizer_states`, ...), whose state
mirrors the model's shapes. `suspicious_globals` lists every global a weights-only load
(`torch.load(weights_only=True)`) would refuse: code that loading the file would import or run.

A DCP checkpoint's `.metadata` pickle maps each state-dict key to its dtype and size.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Callable, Iterator
from typing import Any

from modelwatch import zipdir
from modelwatch.describe import pickles
from modelwatch.describe.pickles import Call, Global, Tensor
from modelwatch.describe.source import Blob, DescribeError, Source, malformed
from modelwatch.describe.tensors import TORCH_DTYPES, Tensors

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_NOT_MODEL = re.compile(r"optim|scheduler", re.IGNORECASE)
_MAX_GLOBALS = 100
_SAFE_MODULES = ("torch.distributed.checkpoint.",)
_SAFE = {
    "collections.OrderedDict", "collections.defaultdict", "builtins.set", "builtins.frozenset",
    "builtins.slice", "builtins.complex", "builtins.bytearray", "builtins.dict", "builtins.list",
    "builtins.tuple", "builtins.int", "builtins.float", "builtins.str", "builtins.bool",
    "_codecs.encode", "torch.Size", "torch.device", "torch.Tensor", "torch.UntypedStorage",
    "torch.nn.parameter.Parameter", "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state", "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_qtensor", "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._utils._rebuild_wrapper_subclass", "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch.sparse_coo", "torch.strided",
    "torch.storage.UntypedStorage", "torch.serialization._get_layout", "pathlib.PosixPath",
    "pathlib.PurePosixPath", "torch.contiguous_format", "torch.channels_last",
    "torch.preserve_format",
    "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct", "copyreg._reconstructor", "copyreg.__newobj__",
}  # fmt: skip


def describe_pytorch(source: Source) -> dict[str, Any]:
    """Tensors, parameter count and suspicious globals of every torch.save zip in the unit."""
    paths = source.paths(lambda p: p.endswith(TORCH_SUFFIXES))
    tensors = Tensors(source.limits.listed)
    suspicious: set[str] = set()
    out: dict[str, Any] = {"files": len(paths)}
    for path in paths:
        try:
            loaded = _load_zip(source, path)
        except DescribeError as exc:
            out.setdefault("error", exc.as_error())
            continue
        suspicious.update(_suspicious(loaded.globals))
        prefix = f"{path}:" if len(paths) > 1 else ""
        storages: dict[str, _StorageUse] = {}  # of this file: only what one pickle built
        for name, tensor, counted in _tensors(loaded.value, source):
            tensors.add(prefix + name, tensor.dtype, list(tensor.shape), count=False)
            if counted:
                use = storages.setdefault(tensor.storage.key, _StorageUse(tensor))
                use.add(tensor)
        for use in storages.values():
            tensors.count(use.dtype, use.elements())
    return {**out, **tensors.summary(), "suspicious_globals": sorted(suspicious)[:_MAX_GLOBALS]}


def _suspicious(names: set[str]) -> list[str]:
    """The globals a weights-only load refuses, each cut to 200 characters, at most 100."""
    return sorted(name[:200] for name in names if not is_safe_global(name))[:_MAX_GLOBALS]


class _StorageUse:
    """The tensors of one storage: tied weights (the same view) count once, and all views
    together count at most the storage's own elements (a slice saved next to its base)."""

    def __init__(self, first: Tensor) -> None:
        self.dtype, self.numel = first.dtype, first.storage.numel
        self.views: set[tuple[Any, ...]] = set()
        self.total = 0

    def add(self, tensor: Tensor) -> None:
        view = (tensor.offset, tuple(tensor.shape), tensor.stride)
        if view not in self.views:
            self.views.add(view)
            self.total += math.prod(tensor.shape)

    def elements(self) -> int:
        return self.total if self.numel is None else min(self.total, self.numel)


def describe_dcp(source: Source) -> dict[str, Any]:
    """The tensors a torch.distributed.checkpoint `.metadata` file declares."""
    path = source.first(lambda p: posixpath.basename(p) == ".metadata", ".metadata")
    loaded = pickles.load(source, path, source.read_small(path, source.limits.pickle_bytes))
    tensors = Tensors(source.limits.listed)
    entries = _attribute(loaded.value, "state_dict_metadata")
    for name, entry in sorted((entries or {}).items(), key=lambda kv: str(kv[0])):
        size = _attribute(entry, "size")
        if isinstance(size, Call) and isinstance(size.args, tuple) and size.args:
            size = size.args[0]
        if isinstance(size, (tuple, list)) and all(isinstance(d, int) for d in size):
            counted = not _NOT_MODEL.search(str(name))
            tensors.add(str(name), _dcp_dtype(entry), list(size), count=counted)
    suspicious = _suspicious(loaded.globals)
    shards = len(source.paths(lambda p: p.endswith(".distcp")))
    return {"shard_count": shards, **tensors.summary(), "suspicious_globals": suspicious}


def is_safe_global(name: str) -> bool:
    """True for globals a weights-only torch.load accepts (tensor rebuilding, dtypes, plain
    containers); everything else needs code to load and is reported."""
    if name in _SAFE or name.startswith(_SAFE_MODULES):
        return True
    module, _, attr = name.rpartition(".")
    return module == "torch" and (attr.endswith("Storage") or attr in TORCH_DTYPES)


def _load_zip(source: Source, path: str) -> pickles.Load:
    with source.open(path) as blob:
        if blob.size < 4 or blob.read(0, 4) != b"PK\x03\x04":
            raise DescribeError(
                "describe_unsupported", path, "not a zip (the legacy torch.save format)"
            )
        found = zip_members(blob, lambda name: name.endswith("/data.pkl"))
        if not found:
            raise malformed(path, "no data.pkl in the zip")
        data = zip_member(blob, found[0], source.limits.pickle_bytes)
    return pickles.load(source, path, data)


def zip_members(blob: Blob, wanted: Callable[[str], bool]) -> list[zipdir.Member]:
    """The members of the zip in `blob` whose names `wanted` accepts (`zipdir`: streamed,
    nothing kept per entry)."""
    try:
        return zipdir.find_members(blob.fd, blob.size, zipdir.MAX_DIRECTORY, wanted)
    except zipdir.ZipError as exc:
        raise malformed(blob.name, f"bad zip: {exc}") from None
    except OSError as exc:
        raise DescribeError("describe_io", blob.name, exc.strerror or str(exc)) from None


def zip_member(blob: Blob, member: zipdir.Member, cap: int) -> bytes:
    """The whole content of `member` (at most `cap` bytes), each MiB counted by the source."""
    pieces = []
    try:
        for piece in zipdir.member_chunks(blob.fd, blob.size, member, cap):
            blob.source.tick(len(piece), 0)
            pieces.append(piece)
    except zipdir.ZipError as exc:
        too_big = isinstance(exc, zipdir.TooLarge)
        raise DescribeError(
            "describe_too_large" if too_big else "describe_malformed", blob.name, str(exc)
        ) from None
    except OSError as exc:
        raise DescribeError("describe_io", blob.name, exc.strerror or str(exc)) from None
    return b"".join(pieces)


def _tensors(value: Any, source: Source) -> Iterator[tuple[str, Tensor, bool]]:
    """(path, tensor, counted) for every tensor reachable in `value`, depth first."""
    todo: list[tuple[str, Any, bool]] = [("", value, True)]
    seen: set[int] = set()
    while todo:
        path, item, counted = todo.pop()
        source.tick()
        if isinstance(item, Tensor):
            yield path, item, counted
            continue
        if id(item) in seen or not isinstance(item, (dict, list, tuple, Call)):
            continue
        seen.add(id(item))
        for key, child in reversed(_children(item)):
            name = f"{path}/{key}" if path else str(key)
            todo.append((name, child, counted and not _NOT_MODEL.search(str(key))))


def _children(item: Any) -> list[tuple[Any, Any]]:
    if isinstance(item, dict):
        return list(item.items())
    if isinstance(item, (list, tuple)):
        return list(enumerate(item))
    state = item.state if isinstance(item, Call) else None
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = state[1]  # (None, slots) from objects with __slots__
    return [*(_children(state) if isinstance(state, (dict, list)) else [])]


def _attribute(obj: Any, name: str) -> Any:
    state = obj.state if isinstance(obj, Call) else None
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = state[1]
    return state.get(name) if isinstance(state, dict) else None


def _dcp_dtype(entry: Any) -> str:
    properties = _attribute(entry, "properties")
    state = properties.state if isinstance(properties, Call) else None
    dtype = state.get("dtype") if isinstance(state, dict) else None
    if isinstance(state, tuple) and state:
        dtype = state[0]  # TensorProperties.__getstate__: (dtype, layout, ...)
    return TORCH_DTYPES.get(dtype.name, dtype.name) if isinstance(dtype, Global) else "unknown"

"""Pickles read as data: a stack machine over `pickletools.genops` that imports nothing.

`torch.save` writes a pickle whose globals rebuild tensors (`torch._utils._rebuild_tensor_v2`)
but a pickle may name any callable (`posix.system`). `pickle.Unpickler` imports globals and
calls them, and even with a `find_class` that never imports, its C memo grows to the largest
`LONG_BINPUT` index (a 5-byte opcode can ask for 32 GiB). Here every opcode is interpreted
by hand: a global becomes a `Global` name, a call becomes a `Call` record (or, for the few
torch rebuild functions, a `Tensor`), the memo is a dict, and every opcode is one step of the
source's budget. What a pickle builds is bounded by its opcodes (`Limits.pickle_ops`): a
16 MiB pickle of `]` would otherwise build 16 million lists (5 GB). Nothing is ever called,
so nothing runs; `Load.globals` lists every global the pickle names, for the caller to
judge.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass, field
from typing import Any

from modelwatch.describe.source import DescribeError, Source, malformed, too_large
from modelwatch.describe.tensors import TORCH_DTYPES, TORCH_STORAGES

_REBUILD_TENSOR = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"}
_REBUILD_PARAMETER = {"_rebuild_parameter", "_rebuild_parameter_with_state"}


@dataclass(eq=False, slots=True)
class Global:
    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, slots=True)
class Call:
    """`func(*args)`, never performed; `state` is what BUILD gave it."""

    func: Any
    args: Any
    state: Any = None


@dataclass(eq=False, slots=True)
class Storage:
    dtype: str
    key: str
    numel: int | None


@dataclass(eq=False, slots=True)
class Tensor:
    dtype: str
    shape: list[int]
    storage: Storage
    offset: int
    stride: tuple[Any, ...]


@dataclass(slots=True)
class Load:
    """What a pickle held (`value`) and every global it named."""

    value: Any
    globals: set[str] = field(default_factory=set)


class _Machine:
    def __init__(self, source: Source, name: str) -> None:
        self.source, self.name = source, name
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.globals: set[str] = set()

    def run(self, data: bytes) -> Any:
        cap = self.source.limits.pickle_ops
        try:
            for count, (opcode, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
                self.source.tick()
                if count >= cap:
                    raise too_large(self.name, f"more than {cap} pickle opcodes")
                if opcode.name == "STOP":
                    return self.stack.pop()
                self.step(opcode.name, arg)
        except DescribeError:
            raise
        except (ValueError, IndexError, KeyError, TypeError, OverflowError) as exc:
            raise malformed(self.name, f"bad pickle: {exc}"[:300]) from None
        raise malformed(self.name, "pickle without STOP")

    def pop_mark(self) -> list[Any]:
        mark = self.marks.pop()
        items = self.stack[mark:]
        del self.stack[mark:]
        return items

    def step(self, op: str, arg: Any) -> None:
        stack = self.stack
        if op in _PUSH_ARG:
            stack.append(arg)
        elif op in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[op])
        elif op in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_SET"):
            stack.append({"EMPTY_LIST": [], "EMPTY_DICT": {}, "EMPTY_TUPLE": ()}.get(op, []))
        elif op == "MARK":
            self.marks.append(len(stack))
        elif op in ("TUPLE", "LIST", "FROZENSET"):
            marked = self.pop_mark()  # a FROZENSET becomes a tuple
            stack.append(marked if op == "LIST" else tuple(marked))
        elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(op[-1])
            if len(stack) < count:
                raise IndexError("stack underflow")
            top = tuple(stack[-count:])
            del stack[-count:]
            stack.append(top)
        elif op == "DICT":
            items = self.pop_mark()
            stack.append(_dict(items))
        elif op in ("APPEND", "APPENDS", "ADDITEMS"):
            items = [stack.pop()] if op == "APPEND" else self.pop_mark()
            target = stack[-1]
            if isinstance(target, list):
                target.extend(items)
        elif op in ("SETITEM", "SETITEMS"):
            items = stack[-2:] if op == "SETITEM" else self.pop_mark()
            if op == "SETITEM":
                del stack[-2:]
            target = stack[-1]
            if isinstance(target, dict):
                target.update(_dict(items))
        elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(arg)] = stack[-1]
        elif op == "MEMOIZE":
            self.memo[len(self.memo)] = stack[-1]
        elif op in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(self.memo[int(arg)])
        elif op in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            found = self.global_(module, name)
            stack.append(found if op == "GLOBAL" else Call(found, tuple(self.pop_mark())))
        elif op == "STACK_GLOBAL":
            name, module = stack.pop(), stack.pop()
            if not isinstance(name, str) or not isinstance(module, str):
                raise TypeError("STACK_GLOBAL of non-strings")
            stack.append(self.global_(module, name))
        elif op == "REDUCE":
            args, func = stack.pop(), stack.pop()
            stack.append(_call(func, args))
        elif op in ("NEWOBJ", "NEWOBJ_EX"):
            if op == "NEWOBJ_EX":
                stack.pop()
            args, cls = stack.pop(), stack.pop()
            stack.append(Call(cls, args))
        elif op == "OBJ":
            items = self.pop_mark()
            stack.append(Call(items[0], tuple(items[1:])))
        elif op == "BUILD":
            state = stack.pop()
            if isinstance(stack[-1], Call):
                stack[-1].state = state
        elif op in ("PERSID", "BINPERSID"):
            stack.append(_persistent(stack.pop() if op == "BINPERSID" else arg))
        elif op == "POP":
            stack.pop()
        elif op == "POP_MARK":
            self.pop_mark()
        elif op == "DUP":
            stack.append(stack[-1])
        elif op in ("PROTO", "FRAME"):
            pass
        else:  # EXT*, buffers: never in a torch.save pickle
            raise ValueError(f"unsupported opcode {op}")

    def global_(self, module: str, name: str) -> Global:
        self.globals.add(f"{module}.{name}")
        return Global(module, name)


_PUSH_ARG = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "UNICODE",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT",
}  # fmt: skip


def load(source: Source, name: str, data: bytes) -> Load:
    """Interpret the pickle `data` (of the file `name`) without importing or calling."""
    machine = _Machine(source, name)
    value = machine.run(data)
    return Load(value, machine.globals)


def _dict(items: list[Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for i in range(0, len(items) - 1, 2):
        try:
            out[items[i]] = items[i + 1]
        except TypeError:  # an unhashable key (a list): not a state dict entry anyway
            continue
    return out


def _persistent(pid: Any) -> Any:
    """torch.save's ('storage', storage type, key, location, numel) -> a Storage."""
    if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage":
        kind = pid[1]
        dtype = TORCH_STORAGES.get(kind.name, "uint8") if isinstance(kind, Global) else "uint8"
        numel = pid[4] if len(pid) >= 5 and isinstance(pid[4], int) else None
        return Storage(dtype, str(pid[2]), numel)
    return Call(Global("", "persistent_load"), pid)


def _call(func: Any, args: Any) -> Any:
    if isinstance(func, Global) and isinstance(args, tuple):
        if func.module == "torch._utils" and func.name in _REBUILD_TENSOR:
            tensor = _tensor(func.name, args)
            if tensor is not None:
                return tensor
        if func.module == "torch._utils" and func.name in _REBUILD_PARAMETER and args:
            return args[0]
        rebuild_from_type = (func.module, func.name) == ("torch._tensor", "_rebuild_from_type_v2")
        if rebuild_from_type and len(args) >= 3 and isinstance(args[2], tuple):
            return _call(args[0], args[2])
        if (func.module, func.name) == ("collections", "OrderedDict"):
            return {}
        if (func.module, func.name) == ("torch", "Size") and args and _is_sequence(args[0]):
            return tuple(args[0])
    return Call(func, args)


def _tensor(name: str, args: tuple[Any, ...]) -> Tensor | None:
    if len(args) < 4 or not isinstance(args[0], Storage):
        return None
    storage, offset, size, stride = args[:4]
    if not isinstance(size, tuple) or not all(isinstance(d, int) and d >= 0 for d in size):
        return None
    dtype = storage.dtype
    if name == "_rebuild_tensor_v3" and len(args) >= 7 and isinstance(args[6], Global):
        dtype = TORCH_DTYPES.get(args[6].name, args[6].name)
    offset = offset if isinstance(offset, int) else 0
    stride = stride if isinstance(stride, tuple) else ()
    return Tensor(dtype, list(size), storage, offset, stride)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (tuple, list))

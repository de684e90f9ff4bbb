"""8. Model description: describing a large SavedModel, ONNX model and safetensors file,
against reading the same files once.

Each model is `describe_mb` MB on the run's tmpfs (so it is in page cache), written with the
exact layouts of tests/describe_files.py: a SavedModel whose `saved_model.pb` holds half the
bytes as a graph definition and whose variables (1,000 of them in the `.index`) hold the
other half, an ONNX model of 1,000 initializers with their `raw_data` inside the file, and a
safetensors file of 1,000 tensors. Each side runs in a fresh interpreter: wall time of the
work alone, and the process's peak RSS (VmHWM). Baseline: `os.read` of every file of the
model once, 8 MiB at a time. Best of `plan.repeats` for the times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.plan import Plan
from bench.report import Result
from tests.describe_files import bundle_entry, field, onnx_model, safetensors, table

TENSORS = 1000
TARGET_RSS_MB = 100.0
_CHUNK = 1 << 20

_DESCRIBE = """
import json, os, sys, time
from modelwatch.formats import describe_model
unit, fmt = sys.argv[1], sys.argv[2]
listing = {}
for d, _, names in os.walk(unit):
    for n in names:
        p = os.path.join(d, n)
        listing[os.path.relpath(p, unit)] = os.path.getsize(p)
fd = os.open(unit, os.O_RDONLY | os.O_DIRECTORY)
started = time.perf_counter()
result = describe_model(fd, listing, fmt)
elapsed = time.perf_counter() - started
assert result is not None and "error" not in result, result
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps([elapsed, int(hwm) / 1024, result["parameter_count"]]))
"""

_READ = """
import json, os, sys, time
started = time.perf_counter()
for d, _, names in os.walk(sys.argv[1]):
    for n in names:
        fd = os.open(os.path.join(d, n), os.O_RDONLY)
        while os.read(fd, 8 << 20):
            pass
        os.close(fd)
elapsed = time.perf_counter() - started
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps([elapsed, int(hwm) / 1024, 0]))
"""


def _write_big(path: str, head: bytes, size: int, tail: bytes = b"") -> None:
    """`head`, then filler up to `size` - len(tail) bytes, then `tail`."""
    block = os.urandom(_CHUNK)
    with open(path, "wb") as out:
        out.write(head)
        left = size - len(head) - len(tail)
        while left > 0:
            left -= out.write(block[: min(left, _CHUNK)])
        out.write(tail)


def _safetensors(unit: str, size: int) -> None:
    per = (size // TENSORS) // 4 * 4
    header = {
        f"layer.{i}.weight": {
            "dtype": "F32",
            "shape": [per // 4],
            "data_offsets": [i * per, (i + 1) * per],
        }
        for i in range(TENSORS)
    }
    head = safetensors(header)
    _write_big(os.path.join(unit, "model.safetensors"), head, len(head) + per * TENSORS)


def _onnx(unit: str, size: int) -> None:
    """The graph of `onnx_model()` and TENSORS initializers, streamed to the file."""
    raw = (size // TENSORS) // 8 * 8
    weights = os.urandom(raw)
    small = onnx_model(initializers=0)
    graph_at = small.index(b"\x3a")  # ModelProto.graph (field 7, length-delimited)
    graph_head, graph = _split_field(small[graph_at:])
    heads = [
        b"\x2a" + _varint(len(init) + len(tail) + raw) + init + tail
        for i in range(TENSORS)
        for init, tail in [
            (
                field(1, 2) + field(1, raw // 8) + field(2, 1) + field(8, f"w{i}"),
                b"\x4a" + _varint(raw),
            )
        ]
    ]
    length = len(graph) + sum(len(h) + raw for h in heads)
    with open(os.path.join(unit, "model.onnx"), "wb") as out:
        out.write(small[:graph_at] + b"\x3a" + _varint(length) + graph)
        for head in heads:
            out.write(head)
            out.write(weights)
        out.write(small[graph_at + len(graph_head) + len(graph) :])


def _saved_model(unit: str, size: int) -> None:
    os.makedirs(os.path.join(unit, "variables"))
    graph_bytes = size // 2
    signature = field(1, field(1, "x") + field(2, field(1, "x:0") + field(2, 1)))
    meta = field(1, field(4, "serve") + field(5, "2.21.0"))
    meta += field(5, field(1, "serving_default") + field(2, signature + field(3, "predict")))
    graph_head = b"\x12" + _varint(graph_bytes)  # MetaGraphDef.graph_def, filled below
    body = field(1, 1) + b"\x12" + _varint(len(meta) + len(graph_head) + graph_bytes)
    _write_big(
        os.path.join(unit, "saved_model.pb"),
        body + meta + graph_head,
        len(body) + len(meta) + len(graph_head) + graph_bytes,
    )
    per = (size - graph_bytes) // TENSORS // 4
    entries = [(f"v{i:04d}".encode(), bundle_entry(1, [per])) for i in range(TENSORS)]
    with open(os.path.join(unit, "variables", "variables.index"), "wb") as out:
        out.write(table([(b"", field(1, 1)), *entries]))
    _write_big(
        os.path.join(unit, "variables", "variables.data-00000-of-00001"), b"", per * 4 * TENSORS
    )


def _split_field(data: bytes) -> tuple[bytes, bytes]:
    """(tag and length, payload) of the length-delimited field at the start of `data`."""
    pos, length, shift = 1, 0, 0
    while True:
        byte = data[pos]
        length |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return data[:pos], data[pos : pos + length]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _measure(script: str, unit: str, fmt: str) -> tuple[float, float, int]:
    done = subprocess.run(
        [sys.executable, "-c", script, unit, fmt], capture_output=True, text=True, check=True
    )
    elapsed, rss, count = json.loads(done.stdout)
    return float(elapsed), float(rss), int(count)


MODELS = {"saved_model": _saved_model, "onnx": _onnx, "safetensors": _safetensors}


def run(plan: Plan, base: str) -> list[Result]:
    size = plan.describe_mb << 20
    results = []
    for fmt, write in MODELS.items():
        unit = os.path.join(base, f"describe-{fmt}")
        os.makedirs(unit)
        write(unit, size)
        ours, theirs = [], []
        for _ in range(plan.repeats):
            ours.append(_measure(_DESCRIBE, unit, fmt))
            theirs.append(_measure(_READ, unit, fmt))
        subprocess.run(["rm", "-rf", unit], check=True)
        time_ours, time_base = min(o[0] for o in ours), min(t[0] for t in theirs)
        rss_ours, rss_base = max(o[1] for o in ours), max(t[1] for t in theirs)
        note = f"{plan.describe_mb} MB {fmt}, {TENSORS} tensors, {ours[0][2]} parameters"
        results += [
            Result(
                f"8. describe {fmt}, time",
                time_ours,
                time_base,
                "s",
                "<= 1x",
                time_ours <= time_base,
                note + f"; best of {plan.repeats}",
            ),
            Result(
                f"8. describe {fmt}, peak RSS",
                rss_ours,
                rss_base,
                "MB",
                f"<= {TARGET_RSS_MB:.0f} MB",
                rss_ours <= TARGET_RSS_MB,
                "baseline: reading every file once, 8 MiB at a time",
            ),
        ]
    return results

"""`python -m bench.parsers [--quick]`: hostile input for each parser of unit bytes.

Each case writes one hostile unit (or metadata text) into a temporary directory and checks it
in a fresh interpreter, which reports the wall time of the check and its peak RSS (VmHWM:
Linux carries ru_maxrss over from a forking parent). The figures are the ones quoted in the
README's "Untrusted input: caps" and in the CHANGELOG; run it against another checkout with
`PYTHONPATH=/path/to/checkout python -m bench.parsers` to compare. The `describe:` cases
describe each hostile file of tests/hostile_models.py (`data.model`), the same way.

Not part of `bench/run.py`: there is no baseline to set these against; the targets are
the memory bounds asserted in tests/test_fuzz_parsers.py.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20

_CHECK = """
import json, os, sys, time
from modelwatch.formats import check_complete, detect_format
from modelwatch.metadata import validate_metadata_bytes
target = sys.argv[1]
started = time.perf_counter()
if os.path.isdir(target):
    sizes = {n: os.path.getsize(os.path.join(target, n)) for n in os.listdir(target)}
    found = check_complete(target, detect_format(sizes), sizes)
    outcome = found and found.message
else:
    data = open(target, "rb").read()
    started = time.perf_counter()
    result = validate_metadata_bytes(data, file="m.json", max_depth=64)
    outcome = [p.code for p in result.problems]
took = time.perf_counter() - started
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"outcome": outcome, "seconds": took, "rss": hwm}))
"""


# Describing: `formats.describe_model`, or `describe.describe_model` in checkouts before it moved.
_DESCRIBE = """
import json, os, sys, time
try:
    from modelwatch.formats import describe_model
except ImportError:
    from modelwatch.describe import describe_model
unit, fmt = sys.argv[1], sys.argv[2]
sizes = {n: os.path.getsize(os.path.join(unit, n)) for n in os.listdir(unit)}
fd = os.open(unit, os.O_RDONLY | os.O_DIRECTORY)
started = time.perf_counter()
described = describe_model(fd, sizes, fmt) or {}
took = time.perf_counter() - started
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
outcome = described.get("error", {}).get("code") or "described"
print(json.dumps({"outcome": outcome, "seconds": took, "rss": hwm}))
"""


def _safetensors(unit: Path, header: bytes, data: int = 0) -> None:
    with open(unit / "m.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + data)


def _tensors(unit: Path, size: int) -> None:
    entries: list[bytes] = []
    length = offset = 0
    while length < size - 100:
        entry = b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
        entries.append(entry % (len(entries), offset, offset + 4))
        length += len(entries[-1]) + 1
        offset += 4
    _safetensors(unit, b"{" + b",".join(entries) + b"}", offset)


def _empty_objects(unit: Path, size: int) -> None:
    _safetensors(unit, b'{"a":[' + b"{}," * (size // 3 - 4) + b"{}]}")


def _tiny_entries(unit: Path, size: int) -> None:
    _safetensors(unit, b"{" + b'"a":0,' * (size // 6 - 1) + b'"a":0}')


def _zip_entries(unit: Path, entries: int) -> None:
    header = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, *[0] * 14)
    with open(unit / "w.pt", "wb") as out:
        out.write(b"PK\x03\x04" + b"\0" * 26)
        for _ in range(entries // 10_000):
            out.write(header * 10_000)
        end = (b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, entries * 46, 30, 0)
        out.write(struct.pack("<4s4H2LH", *end))


def _checkpoint(unit: Path, spaces: int) -> None:
    (unit / "ckpt-1.index").write_bytes(b"")
    (unit / "checkpoint").write_bytes(b'model_checkpoint_path: "x"' + b" " * spaces + b"y\n")


def _metadata(unit: Path, size: int) -> Path:
    path = unit / "gradient-model-metadata.json"
    path.write_bytes(b"[" + b"{}," * (size // 3) + b"{},]")
    return path


def cases(quick: bool) -> list[tuple[str, Callable[[Path], Path | None]]]:
    header, entries, metadata = (
        (2_500_000, 200_000, 100_000) if quick else (25_000_000, 2_000_000, MiB)
    )
    return [
        ("checkpoint, 14,000 spaces in a value", lambda u: _checkpoint(u, 14_000)),
        ("checkpoint, 1 MiB of spaces in a value", lambda u: _checkpoint(u, MiB)),
        (f"safetensors, {header:,} B header of tensors", lambda u: _tensors(u, header)),
        (f"safetensors, {header:,} B header of {{}}", lambda u: _empty_objects(u, header)),
        (f"safetensors, {header:,} B of tiny entries", lambda u: _tiny_entries(u, header)),
        (f"zip, {entries:,} empty entries", lambda u: _zip_entries(u, entries)),
        (f"metadata, {metadata:,} B of {{}} + a trailing comma", lambda u: _metadata(u, metadata)),
    ]


def describe_cases() -> list[tuple[str, str, Callable[[Path], None]]]:
    """(name, format, writer of the unit) for each hostile file of tests/hostile_models.py."""
    from tests.describe_files import write_unit
    from tests.hostile_models import HOSTILE

    def writer(build: Callable[[], dict[str, bytes]]) -> Callable[[Path], None]:
        def write(unit: Path) -> None:
            write_unit(unit, build())

        return write

    return [(f"describe: {name}", fmt, writer(build)) for name, (fmt, build, _) in HOSTILE.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    args = parser.parse_args()
    print(f"{'case':48} {'seconds':>8} {'peak RSS':>10}  outcome", flush=True)
    runs: list[tuple[str, Callable[[Path], Path | None], list[str]]] = [
        (name, make, [_CHECK]) for name, make in cases(args.quick)
    ]
    runs += [(name, make, [_DESCRIBE, fmt]) for name, fmt, make in describe_cases()]
    for name, make, script in runs:
        with tempfile.TemporaryDirectory() as tmp:
            target = make(Path(tmp)) or Path(tmp)
            try:
                done = subprocess.run(
                    [sys.executable, "-c", script[0], str(target), *script[1:]],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=args.timeout,
                    cwd=tmp,  # not the checkout: PYTHONPATH decides which modelwatch runs
                )
            except subprocess.TimeoutExpired:
                print(f"{name:48} {'> ' + str(args.timeout):>8} {'-':>10}  (stopped)", flush=True)
                continue
        report = json.loads(done.stdout)
        outcome = str(report["outcome"])[:60]
        rss = f"{report['rss'] / MiB:.0f} MiB"
        print(f"{name[:48]:48} {report['seconds']:8.2f} {rss:>10}  {outcome}", flush=True)


if __name__ == "__main__":
    main()

"""Describing a hostile file holds a bounded amount of memory, whatever the file claims.

The inspection pool describes up to `inspect_workers` (4) units at once in a sidecar of
256 MiB, so each reader must stay small on any input: each file of tests/hostile_models.py
(one per reader, at or near its cap) is described in a fresh interpreter, and the peak RSS
the description adds to the interpreter's own must stay under READER_BOUND. The description
is still an answer: a precise `error`, or what could be read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.describe_files import write_unit
from tests.hostile_models import HOSTILE

MiB = 1 << 20
# Four workers at this bound, plus the daemon's own 40 MiB, fit in 256 MiB. The largest
# reader is a pickle (held whole, 8 MiB at most) and what its 500,000 opcodes build.
READER_BOUND = 48 * MiB

_SCRIPT = """
import json, os, sys
from modelwatch.formats import describe_model
unit, fmt = sys.argv[1], sys.argv[2]
sizes = {n: os.path.getsize(os.path.join(unit, n)) for n in os.listdir(unit)}
def peak():  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
before = peak()
fd = os.open(unit, os.O_RDONLY | os.O_DIRECTORY)
described = describe_model(fd, sizes, fmt)
print(json.dumps([peak() - before, described]))
"""


def describe_in_subprocess(unit: Path, fmt: str) -> tuple[int, dict[str, object]]:
    """(peak RSS the description added, the description), from a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(unit), fmt],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    added, described = json.loads(done.stdout)
    return added, described


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_file_is_described_in_bounded_memory(tmp_path: Path, name: str) -> None:
    """Each reader's hostile input (a 16 MiB header of `{}`, a million zip entries, 8 MiB of
    pickled lists, keys growing a byte per entry...) is described within READER_BOUND: an
    `error` naming the file and the cap, or the facts with the listings cut."""
    fmt, build, _before = HOSTILE[name]
    write_unit(tmp_path, build())
    added, described = describe_in_subprocess(tmp_path, fmt)
    assert added < READER_BOUND, f"{name}: {added / MiB:.0f} MiB"
    error = described.get("error")
    if error is not None:
        assert isinstance(error, dict)
        assert error["code"] in ("describe_too_large", "describe_malformed")
        assert error["file"] and error["message"]

"""Benchmark results: one row per figure, each next to a baseline measured in the same run."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Result:
    """One figure of modelwatch (`value`) next to its baseline, in the same `unit`.

    `passed` is None when the figure has no target (it is reported for context only).
    """

    name: str
    value: float
    baseline: float
    unit: str
    target: str
    passed: bool | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """value / baseline; None when the baseline is zero (nothing to compare with)."""
        if self.baseline == 0 or not math.isfinite(self.baseline):
            return None
        return self.value / self.baseline

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (`p` in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


_DECIMALS = {"ms": 1, "s": 3, "MB": 1, "%": 2, "MB/s": 0}


def _figure(value: float, unit: str) -> str:
    return f"{value:.{_DECIMALS.get(unit, 2)}f} {unit}"


def _ratio(result: Result) -> str:
    ratio = result.ratio
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _verdict(result: Result) -> str:
    return "-" if result.passed is None else "PASS" if result.passed else "FAIL"


def rows(results: Sequence[Result]) -> list[list[str]]:
    header = ["benchmark", "modelwatch", "baseline", "ratio", "target", "result"]
    body = [
        [
            r.name,
            _figure(r.value, r.unit),
            _figure(r.baseline, r.unit),
            _ratio(r),
            r.target,
            _verdict(r),
        ]
        for r in results
    ]
    return [header, *body]


def table(results: Sequence[Result]) -> str:
    """A Markdown table (readable as plain text too)."""
    lines = rows(results)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def fmt(line: list[str]) -> str:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), rule, *(fmt(line) for line in lines[1:])])


def notes(results: Sequence[Result]) -> str:
    return "\n".join(f"- {r.name}: {r.note}" for r in results if r.note)


def text(results: Sequence[Result], info: dict[str, Any]) -> str:
    """The report for a terminal: heading, table, notes, time per benchmark."""
    m = info["machine"]
    heading = (
        f"modelwatch benchmarks ({info['plan']}): {m['nproc']} CPUs, Linux {m['kernel']}, "
        f"Python {m['python']}, {m['date']}; the run took {info['seconds']} s"
    )
    durations = ", ".join(f"{k}: {v} s" for k, v in info["durations"].items())
    parts = [heading, table(results), "Notes:\n" + notes(results), "Time: " + durations]
    return "\n\n".join(parts)


def to_json(results: Sequence[Result], info: dict[str, Any]) -> str:
    return json.dumps({**info, "results": [r.to_dict() for r in results]}, indent=2)

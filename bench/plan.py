"""How big each benchmark is: the full run (the issue's sizes) and the --quick smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    settle_seconds: float = 1.0  # short, so latency figures are not drowned in waiting
    poll_interval_seconds: float = 1.0
    latency_units: int = 200
    latency_gap_seconds: float = 0.05  # one unit written every gap: no unit waits for another
    latency_files: int = 3
    burst_units: int = 1000
    burst_files: int = 10
    big_units: int = 1000  # the 100,000-file tree of benchmarks 3-5
    big_files: int = 100
    memory_events: int = 100_000
    hot_units: int = 20
    digest_mb: int = 256
    describe_mb: int = 1024  # each of the SavedModel, ONNX and safetensors models of 8
    isolation_units: int = 20  # normal units timed alone, then beside a hostile one
    isolation_sparse_gb: int = 64  # the hostile unit's sparse file: a minute of hashing
    idle_units: int = 100  # 10,000 files
    idle_files: int = 100
    idle_seconds: float = 60.0
    idle_poll_interval_seconds: float = 10.0  # the configured default
    repeats: int = 3  # CPU-bound figures: best of this many, both sides alike
    cluster_daemons: int = 20  # nodes sharing the big tree through each backend
    cluster_window_seconds: float = 30.0
    cluster_lease_seconds: float = 6.0

    @property
    def big_file_count(self) -> int:
        return self.big_units * self.big_files


FULL = Plan("full")
QUICK = Plan(
    "quick",
    latency_units=20,
    burst_units=100,
    big_units=100,
    memory_events=10_000,
    hot_units=5,
    digest_mb=64,
    describe_mb=64,
    isolation_units=5,
    isolation_sparse_gb=16,
    idle_seconds=10.0,
    repeats=2,
    cluster_daemons=2,
    cluster_window_seconds=2.0,
    cluster_lease_seconds=3.0,
)

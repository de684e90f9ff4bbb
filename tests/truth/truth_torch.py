"""torch, ONNX, safetensors and Hugging Face models (filled in below)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def write_all(out: str, unit: Callable[[str], str]) -> dict[str, Any]:
    return {}

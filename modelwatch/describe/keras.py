"""Keras `.keras` archives: a zip of `metadata.json`, `config.json` and `model.weights.h5`.

The two JSON members give the Keras version, the model class, its layers and how it was
compiled. The weights are HDF5, which only libhdf5 reads; parsing untrusted HDF5 in the
daemon is not worth the risk, so a `.keras` model's description carries no parameter count.
"""

from __future__ import annotations

import json
import zipfile
from typing import Any

from modelwatch.describe.pytorch import BlobFile
from modelwatch.describe.source import DescribeError, Source, malformed, too_large


def describe_keras(source: Source) -> dict[str, Any]:
    """Keras version, model class, layer count, loss, metrics and optimizer."""
    path = source.first(lambda p: p.endswith(".keras"), ".keras file")
    members = _members(source, path, ("metadata.json", "config.json"))
    out: dict[str, Any] = {"path": path}
    metadata = members.get("metadata.json")
    if isinstance(metadata, dict) and isinstance(metadata.get("keras_version"), str):
        out["keras_version"] = metadata["keras_version"][:100]
    config = members.get("config.json")
    if not isinstance(config, dict):
        raise malformed(path, "config.json is not a JSON object")
    out.update(_model(config))
    compiled = config.get("compile_config")
    if isinstance(compiled, dict):
        out["loss"] = _names(compiled.get("loss"))
        out["metrics"] = _names(compiled.get("metrics")) or []
        out["optimizer"] = _names(compiled.get("optimizer"))
    return out


def _members(source: Source, path: str, names: tuple[str, ...]) -> dict[str, Any]:
    cap = source.limits.header_bytes
    found: dict[str, Any] = {}
    with source.open(path) as blob:
        try:
            with zipfile.ZipFile(BlobFile(blob, 4 * cap)) as archive:
                for name in names:
                    if name not in archive.namelist():
                        continue
                    info = archive.getinfo(name)
                    if info.file_size > cap:
                        raise too_large(path, f"{name} has {info.file_size} bytes")
                    with archive.open(info) as stream:
                        found[name] = json.loads(stream.read(cap + 1))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
            raise malformed(path, f"bad zip: {exc}") from None
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, DescribeError):
                raise
            raise malformed(path, f"a member is not JSON: {exc}"[:300]) from None
    return found


def _model(config: dict[str, Any]) -> dict[str, Any]:
    class_name = config.get("class_name")
    inner = config.get("config")
    layers = inner.get("layers") if isinstance(inner, dict) else None
    out: dict[str, Any] = {"class_name": class_name if isinstance(class_name, str) else None}
    if isinstance(inner, dict) and isinstance(inner.get("name"), str):
        out["name"] = inner["name"][:200]
    if isinstance(layers, list):
        # Sequential lists its InputLayer in the config but not in `model.layers`
        skip = "InputLayer" if class_name == "Sequential" else None
        out["layer_count"] = sum(
            1 for layer in layers if not isinstance(layer, dict) or layer.get("class_name") != skip
        )
    return out


def _names(value: Any) -> Any:
    """A loss / metric / optimizer as its name: strings as they are, serialized objects as
    their class name, lists and dicts of them likewise (None stays None)."""
    if isinstance(value, str):
        return value[:200]
    if isinstance(value, list):
        return [_names(v) for v in value[:100]]
    if isinstance(value, dict):
        if isinstance(value.get("class_name"), str):
            return value["class_name"][:200]
        return {str(k)[:200]: _names(v) for k, v in list(value.items())[:100]}
    return None

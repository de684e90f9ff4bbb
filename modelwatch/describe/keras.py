"""Keras `.keras` archives: a zip of `metadata.json`, `config.json` and `model.weights.h5`.

The two JSON members give the Keras version, the model class, its layers and how it was
compiled. The weights are HDF5, which only libhdf5 reads; parsing untrusted HDF5 in the
daemon is not worth the risk, so a `.keras` model's description carries no parameter count.

The zip is read with `zipdir` (its directory streamed, nothing kept per entry) and the JSON
members with `jsonscan`, never built whole: each layer and each compile setting is built
alone, from at most 64 KiB of text. `config.json` is scanned twice, once for the layers (at
depth 3) and once for the compile settings (at depth 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from modelwatch import jsonscan, zipdir
from modelwatch.describe.pytorch import zip_members
from modelwatch.describe.source import Blob, DescribeError, Source, malformed, too_large

MAX_VALUE = 64 * 1024  # text of one layer or one compile setting
_MEMBERS = ("metadata.json", "config.json")
_COMPILED = ("loss", "metrics", "optimizer")


def describe_keras(source: Source) -> dict[str, Any]:
    """Keras version, model class, layer count, loss, metrics and optimizer."""
    path = source.first(lambda p: p.endswith(".keras"), ".keras file")
    out: dict[str, Any] = {"path": path}
    with source.open(path) as blob:
        # The last of a duplicated name wins, as in zipfile.
        members = {m.name: m for m in zip_members(blob, lambda name: name in _MEMBERS)}
        if "metadata.json" in members:
            for key, value in _scan(blob, members["metadata.json"], 1):
                if key == ("keras_version",) and isinstance(value, str):
                    out["keras_version"] = value[:100]
        config = members.get("config.json")
        if config is None:
            raise malformed(path, "config.json is not a JSON object")
        out.update(_model(_scan(blob, config, 3)))
        out.update(_compiled(_scan(blob, config, 2)))
    return out


def _scan(blob: Blob, member: zipdir.Member, depth: int) -> Iterator[tuple[jsonscan.Path, Any]]:
    """The member's JSON, scanned to `depth` (see `jsonscan.scan`); errors name the zip."""
    cap = blob.source.limits.header_bytes
    try:
        for pair in jsonscan.scan(
            _chunks(blob, member, cap), build_depth=depth, max_value=MAX_VALUE
        ):
            blob.source.tick()
            yield pair
    except jsonscan.JsonError as exc:
        raise malformed(blob.name, f"{member.name} is not JSON: {exc}"[:300]) from None
    except zipdir.TooLarge:
        raise too_large(blob.name, f"{member.name} has more than {cap} bytes") from None
    except zipdir.ZipError as exc:
        raise malformed(blob.name, f"bad zip: {exc}") from None
    except OSError as exc:
        raise DescribeError("describe_io", blob.name, exc.strerror or str(exc)) from None


def _chunks(blob: Blob, member: zipdir.Member, cap: int) -> Iterator[bytes]:
    for piece in zipdir.member_chunks(blob.fd, blob.size, member, cap):
        blob.source.tick(len(piece), 0)
        yield piece


def _model(pairs: Iterator[tuple[jsonscan.Path, Any]]) -> dict[str, Any]:
    """Class, name and layer count, from `config.json` scanned to depth 3 (each layer)."""
    class_name: Any = None
    is_object = has_layers = False
    name = None
    layers = inputs = 0
    for key, value in pairs:
        if key == ():
            is_object = value is jsonscan.OBJECT
        elif key == ("class_name",):
            class_name = value
        elif key == ("config", "name") and isinstance(value, str):
            name = value[:200]
        elif key == ("config", "layers"):
            has_layers, layers, inputs = value is jsonscan.ARRAY, 0, 0
        elif len(key) == 3 and key[:2] == ("config", "layers"):
            layers += 1
            inputs += isinstance(value, dict) and value.get("class_name") == "InputLayer"
    if not is_object:
        raise DescribeError("describe_malformed", "", "config.json is not a JSON object")
    out: dict[str, Any] = {"class_name": class_name if isinstance(class_name, str) else None}
    if name is not None:
        out["name"] = name
    if has_layers:
        # Sequential lists its InputLayer in the config but not in `model.layers`
        out["layer_count"] = layers - (inputs if class_name == "Sequential" else 0)
    return out


def _compiled(pairs: Iterator[tuple[jsonscan.Path, Any]]) -> dict[str, Any]:
    """Loss, metrics and optimizer, from `config.json` scanned to depth 2."""
    compiled = False
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key == ("compile_config",):
            compiled, found = value is jsonscan.OBJECT, {}
        elif len(key) == 2 and key[0] == "compile_config" and key[1] in _COMPILED:
            found[str(key[1])] = None if value is jsonscan.TOO_LARGE else value
    if not compiled:
        return {}
    return {
        "loss": _names(found.get("loss")),
        "metrics": _names(found.get("metrics")) or [],
        "optimizer": _names(found.get("optimizer")),
    }


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

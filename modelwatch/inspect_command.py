"""`modelwatch inspect PATH`: what modelwatch sees in a model directory (SPEC §3), without a
daemon or a store.

`inspect_report` builds the JSON form (`inspect --format json`): format and model type,
whether the unit may settle (and every reason it may not: an in-progress file, the marker,
an incomplete file), the files, the description (`model`, the very
`data.model` an event of these files carries: the same inspection computes both), the
metrics an event would carry, and the metadata's problems. `render` prints the same as a
short table a person reads at a glance. The unit is read as the daemon reads it (the
`[defaults]` policy: ignore and in-progress patterns, caps), and nothing is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from modelwatch.config import Config
from modelwatch.credentials import one_line
from modelwatch.errors import ModelwatchError
from modelwatch.inspection import inspect_unit, readiness
from modelwatch.manifest import PatternSet, scan_unit
from modelwatch.metadata import SchemaValidator
from modelwatch.units import describe


def inspect_report(path: str, config: Config, schema: SchemaValidator | None) -> dict[str, Any]:
    """The JSON form (see the module docstring); ModelwatchError if `path` is no directory."""
    policy = config.defaults
    manifest = scan_unit(
        path,
        ignore=PatternSet(policy.ignore),
        in_progress=PatternSet(policy.in_progress),
        max_files=policy.max_files_per_unit,
        follow_top=True,
    )
    if not manifest.exists:
        raise ModelwatchError(f"{path}: not a directory")
    reasons = readiness(path, manifest, policy)
    found = inspect_unit(path, manifest, policy, config.metadata, schema)
    data = found.event_data()
    return {
        "path": describe(os.path.abspath(path)),
        "format": found.format,
        "model_type": found.model_type,
        "complete": not reasons,
        "reasons": [reason.to_dict() for reason in reasons],
        "fingerprint": found.fingerprint,
        "file_count": data["file_count"],
        "total_bytes": data["total_bytes"],
        "files": found.files,
        "model": data["model"],
        "metrics": found.metrics,
        "metadata": found.metadata,
        "metadata_ignored": found.metadata_ignored,
        "problems": [p.to_dict() for p in found.problems],
    }


def render(report: dict[str, Any]) -> str:
    """The report as a short table: one fact per line (a list value: one line each)."""
    rows: list[tuple[str, str | list[str]]] = [
        ("format", f"{report['format']} ({report['model_type']})"),
        ("complete", "yes" if report["complete"] else _reasons(report["reasons"])),
        ("files", f"{report['file_count']} files, {_size(report['total_bytes'])}"),
        *_model_rows(report["model"]),
        ("metrics", _metrics(report["metrics"])),
        ("metadata", _metadata(report)),
        *(("problem", f"{p['code']}: {p['message']}") for p in report["problems"][:5]),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [one_line(report["path"])]
    for label, value in rows:
        for i, part in enumerate(value if isinstance(value, list) else [value]):
            lines.append(f"  {label if i == 0 else '':<{width}}  {one_line(str(part))}")
    return "\n".join(lines)


def _model_rows(model: dict[str, Any] | None) -> Iterator[tuple[str, str]]:
    if model is None:
        yield "model", "no description for this format"
        return
    for label, key in (("architecture", "architectures"), ("model", "class_name")):
        if model.get(key):
            yield label, _join(model[key])
    if "layer_count" in model:
        yield "layers", str(model["layer_count"])
    for key in ("model_type", "producer_name", "keras_version", "mlflow_version", "run_id"):
        if model.get(key):
            yield key.replace("_", " "), str(model[key])
    if model.get("flavors"):
        yield "flavors", _join(model["flavors"])
    if "parameter_count" in model:
        yield "parameters", _parameters(model)
    for graph in model.get("meta_graphs") or ():
        for signature in graph.get("signatures") or ():
            yield f"signature {signature['name']}", _signature(signature)
    for side in ("inputs", "outputs"):
        if model.get(side) and not model.get("meta_graphs"):
            yield side, _join(_tensor(t) for t in model[side])
    if model.get("loss"):
        yield "compiled", f"loss {_join(model['loss'])}, optimizer {_join(model.get('optimizer'))}"
    if model.get("suspicious_globals"):
        yield "warning", "loading it runs code: " + _join(model["suspicious_globals"])
    if model.get("error"):
        error = model["error"]
        yield "not read", f"{error['file'] or '-'}: {error['message']} ({error['code']})"


def _reasons(reasons: list[dict[str, Any]]) -> list[str]:
    """`no: <why>`, one line per reason."""
    return [("no: " if i == 0 else "") + reason["message"] for i, reason in enumerate(reasons)]


def _parameters(model: dict[str, Any]) -> str:
    dtypes = ", ".join(f"{name} {count:,}" for name, count in (model.get("dtypes") or {}).items())
    counted = next(
        (_counted(model[f"{kind}_count"], kind) for kind in _KINDS if f"{kind}_count" in model),
        "",
    )
    return f"{model['parameter_count']:,}{counted}" + (f" ({dtypes})" if dtypes else "")


_KINDS = ("tensor", "variable", "initializer")


def _counted(count: int, kind: str) -> str:
    return f" in {count:,} {kind}" + ("" if count == 1 else "s")


def _signature(signature: dict[str, Any]) -> str:
    inputs = _join(_tensor(t) for t in signature["inputs"])
    outputs = _join(_tensor(t) for t in signature["outputs"])
    return f"({inputs}) -> ({outputs})"


def _tensor(tensor: dict[str, Any]) -> str:
    shape = tensor.get("shape")
    dims = "?" if shape is None else ", ".join("?" if d is None else str(d) for d in shape)
    return f"{tensor['name']}: {tensor.get('dtype')}[{dims}]"


def _metrics(metrics: list[dict[str, Any]]) -> list[str]:
    """One line per metric, the first eight."""
    shown = [f"{m['name']} {m['numberValue']:g}" for m in metrics[:8]]
    more = [f"and {len(metrics) - 8} more"] if len(metrics) > 8 else []
    return (shown + more) or ["none"]


def _metadata(report: dict[str, Any]) -> str:
    if report["metadata_ignored"]:
        return "ignored (a Tensorflow model's metadata is generated)"
    if any(p["code"].startswith("metadata_") for p in report["problems"]):
        return "invalid"
    return "valid" if report["metadata"] is not None else "none"


def _join(value: Any, limit: int = 8) -> str:
    items = [value] if isinstance(value, (str, dict)) or value is None else list(value)
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", and {len(items) - limit} more" if len(items) > limit else "")


def _size(nbytes: int) -> str:
    if nbytes < 1000:
        return f"{nbytes} bytes"
    size, unit = float(nbytes), "bytes"
    for unit in ("KB", "MB", "GB", "TB"):  # noqa: B007 - the last unit is the one shown
        size /= 1000
        if size < 1000:
            break
    return f"{size:.1f} {unit}"

"""MLflow models: the `MLmodel` YAML file (flavors, MLflow version, run id, signature).

Reading YAML needs PyYAML, an optional dependency (`pip install 'modelwatch[describe]'`);
without it the description says so in `error`. `yaml.safe_load` builds plain data only; an
alias-heavy document could expand into a huge structure when walked, so the loaded document
is measured with a node budget before anything is taken from it. Before that, the parser's
events are counted (streamed, nothing built): PyYAML builds about 250 bytes per node, so a
1 MiB file of `[],` would take 250 MiB to load; at most `MAX_EVENTS` are loaded (a real
`MLmodel` has about fifty; its signature is one JSON string).
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from modelwatch.describe.source import DescribeError, Source, malformed, too_large

MAX_MLMODEL = 1 << 20
MAX_EVENTS = 20_000
MAX_NODES = 100_000
_TEXT_KEYS = ("mlflow_version", "run_id", "model_uuid", "utc_time_created", "artifact_path")


def describe_mlflow(source: Source) -> dict[str, Any]:
    """Flavors, MLflow version, run id and signature of the shallowest `MLmodel`."""
    path = source.first(lambda p: posixpath.basename(p) == "MLmodel", "MLmodel")
    document = _load_yaml(source, path)
    out: dict[str, Any] = {"path": path}
    flavors = document.get("flavors")
    out["flavors"] = sorted(str(k)[:200] for k in flavors) if isinstance(flavors, dict) else []
    for key in _TEXT_KEYS:
        if isinstance(document.get(key), (str, int, float)):
            out[key] = str(document[key])[:200]
    signature = document.get("signature")
    if isinstance(signature, dict):
        out["signature"] = {
            side: _schema(signature.get(side))
            for side in ("inputs", "outputs", "params")
            if signature.get(side) is not None
        }
    return out


def _load_yaml(source: Source, path: str) -> dict[str, Any]:
    try:
        import yaml  # type: ignore[import-untyped]  # optional; only its two loaders are used
    except ImportError:
        raise DescribeError(
            "describe_unsupported",
            path,
            "reading MLmodel needs PyYAML: pip install 'modelwatch[describe]'",
        ) from None
    text = source.read_small(path, MAX_MLMODEL)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        for count, _ in enumerate(yaml.parse(text, Loader=loader)):
            if count >= MAX_EVENTS:
                raise too_large(path, f"more than {MAX_EVENTS} YAML nodes")
        document = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except DescribeError:
        raise
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise malformed(path, f"not YAML: {exc}"[:300]) from None
    if not isinstance(document, dict):
        raise malformed(path, "not a YAML mapping")
    _measure(document, path)
    return document


def _measure(document: Any, path: str) -> None:
    """Walk the document counting nodes (aliases counted each time they are reached)."""
    todo, count = [document], 0
    while todo:
        item = todo.pop()
        count += 1
        if count > MAX_NODES:
            raise too_large(path, f"more than {MAX_NODES} YAML nodes once aliases expand")
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)


def _schema(value: Any) -> Any:
    """MLflow stores each schema as a JSON string inside the YAML."""
    if isinstance(value, str) and len(value) <= 1 << 16:
        try:  # NaN and Infinity are no JSON: an event must stay valid JSON
            return json.loads(value, parse_constant=_refuse)
        except (ValueError, RecursionError):
            return value[:4096]
    return value[:4096] if isinstance(value, str) else value


def _refuse(name: str) -> Any:
    raise ValueError(name)

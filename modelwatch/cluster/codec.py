"""How unit histories and event bodies are written into the backend, and read back.

A history is one compact JSON document per unit (`encode_history`)::

    {"format": 1, "unit": "/storage/models/exp-1", "last_version": 3, "removals": 0,
     "present": true, "registered": ["sha256:...", 3, "safetensors", "Custom"],
     "fingerprints": {"sha256:...": ["registered", 3, 0, "<event id>", <settled at>, []]},
     "undelivered": ["<event id>"]}

An event body is its CloudEvent JSON, zlib-compressed (file lists compress about tenfold).
What comes back from the backend is checked like any other input: a document that does not
decode is a `ClusterError` naming the unit, never a crash.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from modelwatch.cluster.backend import ClusterError, Stored
from modelwatch.events import Event
from modelwatch.state import Fingerprinted, KnownFingerprint, Registered, UnitHistory

FORMAT = 1
_MAX_EVENT_BYTES = 256 * 1024 * 1024  # an event body inflated past this is not ours


def encode_history(unit: str, history: UnitHistory | None, undelivered: tuple[str, ...]) -> bytes:
    """The stored form of a unit (a unit with no history yet stores only its undelivered)."""
    document: dict[str, Any] = {"format": FORMAT, "unit": unit, "undelivered": list(undelivered)}
    if history is not None:
        registered = history.registered
        document.update(
            last_version=history.last_version,
            removals=history.removals,
            present=history.present,
            registered=None
            if registered is None
            else [
                registered.fingerprint,
                registered.version,
                registered.format,
                registered.model_type,
            ],
            fingerprints={
                fp: [*_known(f.known), f.settled_at, [dict(e) for e in f.errors]]
                for fp, f in sorted(history.fingerprints.items())
            },
        )
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def decode_history(data: bytes, revision: int, where: str) -> tuple[str, Stored]:
    """(unit path, what is stored) from `encode_history`'s bytes; `where` names the record."""
    try:
        document = json.loads(data)
        _check_format(document.get("format"))
        unit = _text(document["unit"])
        undelivered = tuple(_text(i) for i in document["undelivered"])
        history = _history(document) if "last_version" in document else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ClusterError(f"{where}: not a modelwatch unit history ({exc})") from None
    return unit, Stored(revision, history, undelivered)


def _check_format(found: Any) -> None:
    if found != FORMAT:
        raise ValueError(f"format {found!r}, expected {FORMAT} (written by another version?)")


def _known(known: KnownFingerprint) -> list[Any]:
    return [known.outcome, known.version, known.epoch, known.event_id]


def _fingerprinted(entry: Any) -> Fingerprinted:
    outcome, version, epoch, event_id, settled_at, errors = entry
    known = KnownFingerprint(_text(outcome), _optional_int(version), _int(epoch), _text(event_id))
    at = None if settled_at is None else float(settled_at)
    return Fingerprinted(known, at, tuple(e for e in errors if isinstance(e, dict)))


def _history(document: dict[str, Any]) -> UnitHistory:
    registered = document["registered"]
    known = {_text(fp): _fingerprinted(entry) for fp, entry in document["fingerprints"].items()}
    return UnitHistory(
        last_version=_int(document["last_version"]),
        removals=_int(document["removals"]),
        present=bool(document["present"]),
        registered=None
        if registered is None
        else Registered(
            _text(registered[0]),
            _int(registered[1]),
            _optional_text(registered[2]),
            _optional_text(registered[3]),
        ),
        fingerprints=known,
    )


def encode_event(event: Event) -> bytes:
    return zlib.compress(event.to_json().encode(), 6)


def decode_event(data: bytes, where: str) -> Event:
    try:
        return Event.from_json(_inflate(data).decode())
    except (zlib.error, ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"{where}: not a stored event ({exc})") from None


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, _MAX_EVENT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("larger than an event can be")
    if not inflater.eof:
        raise ValueError("cut short")
    return text


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)

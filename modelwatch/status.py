"""`modelwatch status`: what the state store says, as data and as text (SPEC §3).

`status_report` builds the JSON form (`status --format json`): roots and their
availability, units with their latest version and state, per-sink pending / dead / discarded
counts with the oldest pending age, every dead letter, and with a cluster backend who holds
each shared root (`cluster.report.lease_report`, passed in). `render` prints the same as
tables a person reads at a glance. Both only read the store. `live_status` is the running
daemon's `/api/status`: the same, plus what only the daemon knows (each root's observer and
state now, every pending unit with its reasons, the latest events).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from modelwatch.config import Config
from modelwatch.pending import Snapshot, Waiting, reasons
from modelwatch.state import Store
from modelwatch.units import describe


def status_report(
    config: Config, store: Store, now: float, cluster: dict[str, Any] | None = None
) -> dict[str, Any]:
    known_roots = {r.path: r for r in store.units.roots()}
    roots = []
    for root in config.roots:
        record = known_roots.get(describe(root.path))
        roots.append(
            {
                "path": describe(root.path),
                "unit_depth": root.unit_depth,
                "state": record.state if record else "unknown",
                "reason": record.reason if record else None,
                "observer": record.observer if record else None,
                "since": record.since if record else None,
            }
        )
    units = [
        {
            "path": u.path,
            "root": u.root,
            "version": u.registered_version,
            "fingerprint": u.registered_fp,
            "state": "present" if u.present else "removed",
        }
        for u in store.units.all()
    ]
    sinks = [
        {
            "sink": s.sink,
            "pending": s.pending,
            "dead": s.dead,
            "discarded": s.discarded,
            "oldest_pending_seconds": _age(s.oldest_pending, now),
        }
        for s in store.outbox.sink_stats()
    ]
    dead = [
        {
            "sink": d.sink,
            "event_id": d.event_id,
            "unit": d.unit,
            "type": d.type.rsplit(".", 1)[-1],
            "attempts": d.attempts,
            "last_error": d.last_error,
        }
        for d in store.outbox.dead_letters()
    ]
    report = {"roots": roots, "units": units, "sinks": sinks, "dead_letters": dead}
    if cluster is not None:
        report["cluster"] = cluster
    return report


def live_status(
    config: Config,
    store: Store,
    snapshot: Snapshot,
    *,
    observers: Mapping[str, str],
    recent: Sequence[Mapping[str, Any]],
    now: float,
    monotonic: float,
) -> dict[str, Any]:
    """`status_report` (`now`: wall time) with the daemon's own view: `observers` (root path
    -> inotify | polling | missing), the settle loop's `snapshot` of roots and pending units
    (its times are `monotonic`), and the `recent` events, oldest first."""
    report = status_report(config, store, now)
    for row, root in zip(report["roots"], config.roots, strict=True):
        live = snapshot.roots.get(root.path)
        if live is not None:
            row["state"] = "available" if live.available else "unavailable"
            row["reason"] = live.reason or None
        row["observer"] = observers.get(root.path, row["observer"])
    listed = {row["sink"] for row in report["sinks"]}
    report["sinks"] += [  # configured sinks with nothing in the outbox: all delivered
        {"sink": s.name, "pending": 0, "dead": 0, "discarded": 0, "oldest_pending_seconds": None}
        for s in config.sinks
        if s.name not in listed
    ]
    waiting = sorted(snapshot.pending.values(), key=lambda w: w.timers.first_change)
    report["pending"] = [_pending_row(w, snapshot, monotonic) for w in waiting]
    report["recent_events"] = [dict(event) for event in recent]
    return report


def _pending_row(waiting: Waiting, snapshot: Snapshot, monotonic: float) -> dict[str, Any]:
    why = reasons(waiting, snapshot.roots, monotonic)
    return {
        "path": waiting.unit.display,
        "root": describe(waiting.unit.root),
        "pending_seconds": round(max(0.0, monotonic - waiting.timers.first_change), 1),
        "summary": why[0].message if why else "",
        "reasons": [r.to_dict() for r in why],
    }


def render(report: dict[str, Any]) -> str:
    parts = [
        table(
            ["ROOT", "STATE", "OBSERVER", "REASON"],
            [
                [r["path"], r["state"], r["observer"] or "-", r["reason"] or ""]
                for r in report["roots"]
            ],
        ),
        table(
            ["UNIT", "VERSION", "STATE"],
            [[u["path"], str(u["version"] or "-"), u["state"]] for u in report["units"]],
        ),
        table(
            ["SINK", "PENDING", "DEAD", "DISCARDED", "OLDEST PENDING"],
            [
                [
                    s["sink"],
                    str(s["pending"]),
                    str(s["dead"]),
                    str(s["discarded"]),
                    _fmt_age(s["oldest_pending_seconds"]),
                ]
                for s in report["sinks"]
            ],
        ),
    ]
    if report.get("cluster"):
        parts.append(_cluster_table(report["cluster"]))
    if report["dead_letters"]:
        parts.append(
            table(
                ["DEAD LETTER", "SINK", "UNIT", "TYPE", "ATTEMPTS", "LAST ERROR"],
                [
                    [
                        d["event_id"][:12],
                        d["sink"],
                        d["unit"],
                        d["type"],
                        str(d["attempts"]),
                        one_line(d["last_error"] or "", 120),
                    ]
                    for d in report["dead_letters"]
                ],
            )
        )
    return "\n\n".join(parts)


def _cluster_table(cluster: dict[str, Any]) -> str:
    rows = [[r["path"], r["role"], r["holder"] or "-"] for r in cluster["roots"]]
    text = table(["SHARED ROOT", "ROLE", "HOLDER"], rows)
    note = f"cluster: {cluster['backend']}, this node is {cluster['node_id']}"
    if cluster.get("error"):
        note += f"; backend unreachable: {one_line(cluster['error'], 160)}"
    return note + "\n" + text


def one_line(text: str, limit: int) -> str:
    """`text` on one printable line of at most `limit` characters."""
    flat = "".join(c if c.isprintable() else " " for c in text)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _age(created: float | None, now: float) -> float | None:
    return None if created is None else round(max(0.0, now - created), 1)


def _fmt_age(age: float | None) -> str:
    return "-" if age is None else f"{age:.0f}s"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)

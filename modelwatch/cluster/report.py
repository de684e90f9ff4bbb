"""What `modelwatch status` says about the cluster: who holds each shared root now.

Asked from the backend, read-only (the lease records only), so it answers from any node,
whether a daemon runs there or not. A backend that cannot be reached is reported, not
raised: the rest of `status` still prints.
"""

from __future__ import annotations

from typing import Any

from modelwatch.cluster.backend import Backend, ClusterError
from modelwatch.cluster.connect import connect
from modelwatch.cluster.sharing import shared_roots
from modelwatch.config import Config
from modelwatch.units import describe


def lease_report(config: Config, backend: Backend | None = None) -> dict[str, Any] | None:
    """`{"backend", "node_id", "error", "roots": [{"path", "role", "holder"}]}`, role being
    `holder` (this node), `standby` (another node holds it), `unheld` or `unknown` (the
    backend did not answer: `error` says why); None without a cluster backend."""
    cluster = config.cluster
    if not cluster.enabled:
        return None
    roots = shared_roots(config)
    report: dict[str, Any] = {"backend": cluster.backend, "node_id": cluster.node_id}
    report.update(error=None, roots=[])
    if not roots:
        return report
    try:
        backend = backend if backend is not None else connect(cluster)
    except ClusterError as exc:
        return {**report, "error": str(exc), "roots": [_row(r, "unknown") for r in roots]}
    try:
        for root in roots:
            holder = backend.holder(root)
            role = (
                "unheld" if holder is None else "holder" if holder == cluster.node_id else "standby"
            )
            report["roots"].append(_row(root, role, holder))
    except ClusterError as exc:
        done = {row["path"] for row in report["roots"]}
        report["roots"] += [_row(r, "unknown") for r in roots if describe(r) not in done]
        report["error"] = str(exc)
    finally:
        backend.close()
    return report


def _row(root: str, role: str, holder: str | None = None) -> dict[str, Any]:
    return {"path": describe(root), "role": role, "holder": holder}

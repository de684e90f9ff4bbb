"""Inspecting a settled unit: readiness, fingerprint, format, files, metadata, description.

`readiness` answers "may this stable unit settle?" (SPEC §2 rules 3-5); `inspect_unit` turns a
settled unit's manifest into the facts an event carries, with problems as data, and its
description (`modelwatch.description`: `data.model`, TensorBoard metrics) unless `prior`
knows it already.

Both read the unit directory the manifest was scanned from and nothing else: it is opened as
`beneath.open_unit` describes (not followed unless it is a depth-0 root, and with the device
and inode the scan saw), and every file below it one component at a time with O_NOFOLLOW. A
unit directory that cannot be opened again (swapped since the scan, gone, ESTALE) makes the
unit not ready, and `inspect_unit` raise `UnitUnavailable`: it is looked at again later,
nothing is recorded from what could not be read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from modelwatch.beneath import open_unit
from modelwatch.config import MetadataConfig, UnitPolicy
from modelwatch.description import Description, Prior, describe_unit
from modelwatch.errors import Problem, UnitUnavailable
from modelwatch.formats import check_complete, detect_format, model_type_for
from modelwatch.manifest import Manifest, fingerprint, sha256_file
from modelwatch.metadata import SchemaValidator, validate_unit_metadata
from modelwatch.progress import progress
from modelwatch.reasons import Reason, naming


def readiness(unit_dir: str, manifest: Manifest, policy: UnitPolicy) -> tuple[Reason, ...]:
    """Every reason a stable unit may not settle yet (SPEC §2 rules 3-5); () when it may.

    All of them, not the first: whoever asks why a model waits (`explain`) learns at once
    that the in-progress file is gone but the marker is still missing.
    """
    if manifest.too_many_files and not manifest.unreadable:
        return ()  # settles, then is rejected with a precise problem
    reasons: list[Reason] = []
    if manifest.unreadable:
        reasons.append(_unreadable(manifest.unreadable))
    if manifest.in_progress:
        reasons.append(naming("in_progress", "in-progress files present", manifest.in_progress))
    marker = policy.require_marker
    if marker and marker not in manifest.sizes:
        missing = f"marker file {marker} not present (require_marker)"
        reasons.append(Reason("missing_marker", missing, (marker,)))
    # Completeness is judged on a full listing only: what could not be read may hold the
    # very files the check would call missing.
    incomplete = None if manifest.unreadable else _completeness(unit_dir, manifest)
    if incomplete is not None:
        reasons.append(incomplete)
    return tuple(reasons)


def _unreadable(entries: tuple[str, ...]) -> Reason:
    reason = naming("unreadable", "cannot read", entries)
    # The scan lists each as "path (strerror)": `files` holds the paths alone.
    return replace(reason, files=tuple(e.rpartition(" (")[0] or e for e in reason.files))


def _completeness(unit_dir: str, manifest: Manifest) -> Reason | None:
    """The format's completeness check (SPEC §6), its reason prefixed with the format."""
    sizes = manifest.sizes
    fmt = detect_format(sizes)
    reason = check_complete(
        unit_dir, fmt, sizes, follow_top=manifest.follow_top, identity=manifest.identity
    )
    if reason is None or reason.code != "incomplete":
        return reason
    return replace(reason, message=f"{fmt} incomplete: {reason.message}")


@dataclass(frozen=True, slots=True)
class Inspection:
    fingerprint: str
    format: str
    model_type: str
    files: list[dict[str, Any]]
    total_bytes: int
    metadata: Any = None
    metadata_ignored: bool = False
    metrics: list[dict[str, Any]] = field(default_factory=list)
    problems: tuple[Problem, ...] = ()
    description: Description | None = None  # None: not described (an unfinished inspection)

    def event_data(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "format": self.format,
            "fingerprint": self.fingerprint,
            "files": self.files,
            "file_count": len(self.files),
            "total_bytes": self.total_bytes,
            "metadata": self.metadata,
            "metadata_ignored": self.metadata_ignored,
            "metrics": self.metrics,
            "model": self.description.model if self.description is not None else None,
        }


def inspect_unit(
    unit_dir: str,
    manifest: Manifest,
    policy: UnitPolicy,
    meta: MetadataConfig,
    schema: SchemaValidator | None = None,
    *,
    prior: Prior | None = None,
) -> Inspection:
    """Everything an event says about a settled unit (UnitUnavailable: try again later).

    `prior(fingerprint)` gives the description known for the fingerprint, if any; without
    one the files are described.
    """
    try:
        unit_fd = open_unit(unit_dir, follow_top=manifest.follow_top, identity=manifest.identity)
    except OSError as exc:
        raise UnitUnavailable(f"unit directory cannot be opened ({exc.strerror})") from exc
    try:
        found = _inspect(unit_dir, unit_fd, manifest, policy, meta, schema)
        return _described(found, unit_fd, manifest, policy, prior)
    finally:
        os.close(unit_fd)


def _described(
    found: Inspection, unit_fd: int, manifest: Manifest, policy: UnitPolicy, prior: Prior | None
) -> Inspection:
    """`found` with its description; TensorBoard metrics for Tensorflow models and for units
    whose metadata has no `metrics` (SPEC §5)."""
    document = found.metadata
    scalars = found.model_type == "Tensorflow" or not (
        isinstance(document, dict) and "metrics" in document
    )
    description = prior(found.fingerprint) if prior is not None else None
    if description is None:
        description = describe_unit(
            unit_fd,
            manifest.sizes,
            found.format,
            scalars=scalars,
            max_entries=policy.max_files_per_unit,
            event_files=manifest.event_files if manifest.exists else None,
        )
    metrics = list(description.scalars) if scalars else found.metrics
    return replace(found, description=description, metrics=metrics)


def _inspect(
    unit_dir: str,
    unit_fd: int,
    manifest: Manifest,
    policy: UnitPolicy,
    meta: MetadataConfig,
    schema: SchemaValidator | None,
) -> Inspection:
    digests = None
    if policy.content_digest == "sha256":
        digests = _digests(unit_dir, unit_fd, manifest)
    files = [_file_row(e.path, e.size, e.symlink_target, digests, e.raw) for e in manifest.entries]
    fmt = detect_format(manifest.sizes)
    model_type = policy.model_type if policy.model_type != "auto" else model_type_for(fmt)
    problems = list(_manifest_problems(manifest, policy.max_files_per_unit))
    ignored = model_type == "Tensorflow" and meta.filename in manifest.sizes
    document: Any = None
    metrics: list[dict[str, Any]] = []
    if model_type != "Tensorflow":
        result = validate_unit_metadata(
            unit_dir,
            meta.filename,
            max_bytes=meta.max_bytes,
            max_depth=meta.max_depth,
            schema=schema,
            dir_fd=unit_fd,
        )
        problems.extend(result.problems)
        # A parseable document travels with its rejection (whoever debugs a schema error
        # wants to see it); only a valid one supplies metrics.
        document, metrics = result.document, result.metrics
    return Inspection(
        fingerprint=fingerprint(manifest.entries, digests),
        format=fmt,
        model_type=model_type,
        files=files,
        total_bytes=manifest.total_bytes,
        metadata=document,
        metadata_ignored=ignored,
        metrics=metrics,
        problems=tuple(problems),
    )


def _digests(unit_dir: str, unit_fd: int, manifest: Manifest) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for e in manifest.files:
        progress()
        digest = sha256_file(unit_dir, e, dir_fd=unit_fd)
        out[e.raw] = digest if digest is not None else "unreadable"
    return out


def _file_row(
    path: str, size: int, target: str | None, digests: dict[bytes, str] | None, raw: bytes
) -> dict[str, Any]:
    row: dict[str, Any] = {"path": path, "size": size}
    if digests is not None and target is None:
        row["sha256"] = digests.get(raw)
    if target is not None:
        row["symlink"] = target
    return row


def _manifest_problems(manifest: Manifest, max_files: int) -> list[Problem]:
    problems = []
    if manifest.too_many_files:
        message = f"more than {max_files} entries (files, directories, links) in the unit"
        problems.append(Problem("too_many_files", message))
    return problems


def unfinished(manifest: Manifest, policy: UnitPolicy, problem: Problem) -> Inspection:
    """What a unit whose inspection could not finish is rejected with: its files and their
    stat fingerprint (no content digests, no metadata), and `problem`."""
    fmt = detect_format(manifest.sizes)
    model_type = policy.model_type if policy.model_type != "auto" else model_type_for(fmt)
    return Inspection(
        fingerprint=fingerprint(manifest.entries),
        format=fmt,
        model_type=model_type,
        files=[_file_row(e.path, e.size, e.symlink_target, None, e.raw) for e in manifest.entries],
        total_bytes=manifest.total_bytes,
        problems=(problem,),
    )

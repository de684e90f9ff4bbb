"""The work the inspection pool does for the settle loop, one job per step of a unit's life.

Each job reads the disk (and, for a reconcile, the state store) and returns a typed result;
it decides nothing about time and writes nothing. The settle loop, which alone owns pending
units and writes outcomes, feeds the results to its `Settler` and the registry:

* `scan`: a probe or final scan of a pending unit -> `Scanned`.
* `examine`: a unit found stable -> `Examined` with one outcome: `Settled` (inspected, or
  gone from an available root), `NotReady` (in-progress file, incomplete, no marker, I/O
  error), `RootDown` (its root is unavailable: nothing is removed) or `Retry`.
* `overdue`: a unit past `max_wait` -> `Overdue` (what its `not_settled` event says).
* `reconcile`: a root (or part of it) compared with the store -> `Reconciled`.
* `diagnose`: one look at a unit, without waiting (for `explain` when no daemon runs) ->
  `Diagnosis`: the root's availability and readiness, the same checks `examine` makes.

Jobs run under a time budget (`inspect_timeout_seconds`): an inspection that runs past it
(hashing a sparse 1 TB file, say) ends as `Settled` with an `inspection_timeout` problem, so
the unit is rejected once instead of holding a worker, or restarting the daemon, forever.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field

from modelwatch.clock import Clock
from modelwatch.config import MetadataConfig
from modelwatch.description import NOT_NEEDED, Description, Prior
from modelwatch.errors import Problem, UnitUnavailable
from modelwatch.inspection import Inspection, inspect_unit, readiness, unfinished
from modelwatch.manifest import Manifest, fingerprint
from modelwatch.metadata import SchemaValidator
from modelwatch.pending import root_unavailable
from modelwatch.progress import OverBudget
from modelwatch.reasons import Reason
from modelwatch.roots import Availability, check_root
from modelwatch.rules import RootRules
from modelwatch.state import Store, UnitRecord
from modelwatch.units import Unit, describe, list_units


@dataclass(frozen=True, slots=True)
class Context:
    """What a job needs, as the settle loop saw it when it submitted the job."""

    rules: RootRules
    metadata: MetadataConfig
    schema: SchemaValidator | None
    known_device: int | None  # the device the root's units were last seen on
    clock: Clock
    store: Store | None = None  # the worker's own connection, set when the job runs


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scanned:
    unit: Unit
    token: int
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class Settled:
    """Stable and inspected (`found`), or gone from an available root (`found` None)."""

    found: Inspection | None
    scan_digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class NotReady:
    reasons: tuple[Reason, ...]
    key: object


@dataclass(frozen=True, slots=True)
class RootDown:
    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str


Outcome = Settled | NotReady | RootDown | Retry


@dataclass(frozen=True, slots=True)
class Examined:
    unit: Unit
    token: int
    outcome: Outcome
    availability: Availability  # of the unit's root, checked first
    key: object = None  # from `final_check`: the final scan's stat key (equal to the probe's)


@dataclass(frozen=True, slots=True)
class Overdue:
    unit: Unit
    token: int
    found: Inspection | None  # None: nothing to report (gone, empty, unreadable)
    reasons: tuple[Reason, ...]  # (): the files kept changing


@dataclass(frozen=True, slots=True)
class Reconciled:
    root: str
    token: int
    availability: Availability
    changed: list[Unit] = field(default_factory=list)  # to make pending
    healed: list[tuple[str, bytes | None]] = field(default_factory=list)  # digests to store
    gone: list[Unit] = field(default_factory=list)  # recorded present, no longer on disk


@dataclass(frozen=True, slots=True)
class Crashed:
    """A job raised something it should not have (a bug): logged, the unit retried."""

    unit: Unit | None
    root: str
    token: int
    error: BaseException


# -- jobs ------------------------------------------------------------------------------------


def scan(ctx: Context, unit: Unit, token: int) -> Scanned:
    return Scanned(unit, token, ctx.rules.scan(unit))


def final_check(ctx: Context, unit: Unit, token: int, probe: object) -> Scanned | Examined:
    """The final scan of a unit whose probe scan gave `probe`: when nothing changed, the unit
    is examined in the same job (one trip through the pool instead of two); otherwise the
    scan goes back to the settle loop, which restarts the quiet period."""
    manifest = ctx.rules.scan(unit)
    if manifest.stat_key != probe:
        return Scanned(unit, token, manifest)
    examined = examine(ctx, unit, token, manifest)
    return Examined(unit, token, examined.outcome, examined.availability, manifest.stat_key)


def examine(ctx: Context, unit: Unit, token: int, manifest: Manifest) -> Examined:
    """Root availability, then readiness, then inspection, of a unit whose scans were stable.

    Nothing of an unavailable root settles: not a removal (its files may be on a mount that
    went away), and not a registration either (its `root_marker` says it is not complete).
    """
    present = manifest.exists and not manifest.empty
    availability = check_root(ctx.rules.config, ctx.known_device, holds_units=present or None)
    if not availability.available:
        return Examined(unit, token, RootDown(availability.reason), availability)
    return Examined(unit, token, _examine(ctx, unit, manifest), availability)


def _examine(ctx: Context, unit: Unit, manifest: Manifest) -> Outcome:
    if not manifest.exists or manifest.empty:
        # Gone from an available root: removed, if it is still gone now that the root was
        # found available (a mount coming back between the scan and the check).
        again = ctx.rules.scan(unit)
        if again.exists and not again.empty:
            back = Reason("quiet_period", "the unit reappeared while it was checked")
            return NotReady((back,), again.stat_key)
        return Settled(None)
    policy = ctx.rules.config.policy
    try:
        reasons = readiness(unit.path, manifest, policy)
        if reasons:
            return NotReady(reasons, manifest.stat_key)
        prior = _prior(ctx.store, unit)
        found = inspect_unit(unit.path, manifest, policy, ctx.metadata, ctx.schema, prior=prior)
    except UnitUnavailable as exc:  # gone or swapped since the scan, or ESTALE: later
        return Retry(str(exc))
    except OverBudget as exc:
        # Its digest is stored whatever the files' age: a reconcile must not start the same
        # hopeless inspection again and again.
        return Settled(_timed_out(manifest, ctx, exc), ctx.rules.keyed(manifest.scan_digest))
    return Settled(found, ctx.rules.to_store(manifest, ctx.clock.time()))


def _prior(store: Store | None, unit: Unit) -> Prior | None:
    """What the store knows of a fingerprint's description: nothing is described for files
    whose event was emitted already, nor again for files that come back (a restore)."""
    if store is None:
        return None

    def prior(fp: str) -> Description | None:
        current, stored = store.units.fingerprint_facts(unit.display, fp)
        if current:
            return NOT_NEEDED
        try:
            return Description.from_json(stored) if stored is not None else None
        except ValueError:  # damaged: the files are described again
            return None

    return prior


def _timed_out(manifest: Manifest, ctx: Context, exc: OverBudget) -> Inspection:
    message = (
        f"inspection {exc}; the unit is rejected instead of holding a worker "
        f"(raise inspect_timeout_seconds for models this large)"
    )
    return unfinished(manifest, ctx.rules.config.policy, Problem("inspection_timeout", message))


def overdue(ctx: Context, unit: Unit, token: int) -> Overdue:
    """What a unit pending past `max_wait` holds now, for its `not_settled` event."""
    manifest = ctx.rules.scan(unit)
    if not manifest.exists or manifest.empty:
        return Overdue(unit, token, None, ())
    policy = ctx.rules.config.policy
    reasons = readiness(unit.path, manifest, policy)
    try:
        found = inspect_unit(unit.path, manifest, policy, ctx.metadata, ctx.schema)
    except UnitUnavailable:  # reported at its next overdue check
        return Overdue(unit, token, None, ())
    except OverBudget as exc:
        found = _timed_out(manifest, ctx, exc)
    return Overdue(unit, token, found, reasons)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """What one look at a unit found: its root's availability, its scan (None when the root
    is unavailable) and every reason it may not settle (a file changed less than
    `settle_seconds` ago is one)."""

    availability: Availability
    manifest: Manifest | None
    reasons: tuple[Reason, ...]


def diagnose(ctx: Context, unit: Unit) -> Diagnosis:
    """The checks `examine` makes, once, without the two scans a quiet period takes."""
    availability = check_root(ctx.rules.config, ctx.known_device)
    if not availability.available:
        return Diagnosis(availability, None, (root_unavailable(unit.root, availability.reason),))
    manifest = ctx.rules.scan(unit)
    if not manifest.exists or manifest.empty:
        return Diagnosis(availability, manifest, ())
    reasons = readiness(unit.path, manifest, ctx.rules.config.policy)
    newest = max((e.mtime_ns for e in manifest.entries), default=0) / 1e9
    settle, ago = ctx.rules.timing.settle_seconds, ctx.clock.time() - newest
    if ago < settle:
        recent = f"a file changed {max(0.0, ago):.1f} s ago (settle_seconds {settle:g} s)"
        reasons = (Reason("quiet_period", recent), *reasons)
    return Diagnosis(availability, manifest, reasons)


def reconcile(
    ctx: Context,
    store: Store,
    root: str,
    below: str,
    token: int,
    skip: Collection[Unit],
) -> Reconciled:
    """Find every unit under `root` (below `below`) that may have changed since the store
    last saw it: appeared, changed, or absent (absent ones only when the root is available).

    A unit whose files still have the scan digest stored with its fingerprint costs one stat
    walk; otherwise it is scanned, and an unchanged one (fingerprint current) gets its digest
    stored for the next pass. Units in `skip` (already pending) are left alone.
    """
    rules = ctx.rules
    availability = check_root(rules.config, ctx.known_device)
    records = store.units.all(describe(root))
    stored_digests = {r.path: r.scan_digest for r in records if r.present}
    result = Reconciled(root, token, availability)
    for unit in _candidates(root, below, rules, records, availability.available):
        if unit in skip:
            continue
        stored = stored_digests.get(unit.display)
        try:
            if stored is not None and rules.digest(unit) == stored:
                continue  # nothing on disk changed since its fingerprint was known
            manifest = rules.scan(unit)
            unchanged = manifest.exists and not _maybe_changed(ctx, store, unit, manifest)
        except OverBudget:
            raise
        except Exception:  # the unit is settled the slow way rather than skipped
            unchanged, manifest = False, None
        if manifest is not None and not manifest.exists and unit.display in stored_digests:
            result.gone.append(unit)
        elif not unchanged or manifest is None:
            result.changed.append(unit)
        elif (digest := rules.to_store(manifest, ctx.clock.time())) is not None:
            result.healed.append((unit.display, digest))
    return result


def _candidates(
    root: str, below: str, rules: RootRules, records: list[UnitRecord], available: bool
) -> list[Unit]:
    """Units on disk under `root`, plus (when the root is available) units the store
    believes are present there: those may have been removed.

    The store keys units by their display path; a record that matches a unit found on disk
    is that unit (names that are not UTF-8 cannot be rebuilt from the display form).
    """
    found = set(list_units(root, rules.config.unit_depth, below))
    if available:
        on_disk = {unit.display for unit in found}
        prefix = describe(os.path.join(root, below)) if below else describe(root)
        for record in records:
            inside = record.path == prefix or record.path.startswith(prefix + "/")
            if record.present and inside and record.path not in on_disk:
                gone = os.path.relpath(record.path, describe(root))
                found.add(Unit(root, gone))  # relpath gives "." for a depth-0 root
    return sorted(found)


def _maybe_changed(ctx: Context, store: Store, unit: Unit, manifest: Manifest) -> bool:
    if ctx.rules.config.policy.content_digest != "none" or manifest.in_progress:
        return True  # the content fingerprint is only computed when the unit settles
    return not store.units.is_current(unit.display, fingerprint(manifest.entries))

"""What a cluster backend keeps, and the one interface the Redis and NATS backends implement.

Per shared root the backend holds:

* a **lease**: which node registers the root now (`acquire`, `renew`, `release`), with an
  expiry the backend enforces, so a dead holder's lease ends by itself;
* the **history** of every unit of the root (`load`, `commit`): versions, known fingerprints,
  removals (`state.UnitHistory`) and the ids of events committed but not yet confirmed
  delivered (`undelivered`). Every write is a compare-and-set on the unit's revision, so two
  nodes can never give one version to two fingerprints, or two versions to one;
* the **bodies of undelivered events** (`events`), so whichever node holds the root next can
  deliver them with the same ids (SPEC §12).

Errors (all `ClusterError`): `BackendUnavailable` (cannot reach it, or it failed: retried),
`LeaseLost` (the lease is another node's now), `Conflict` (a compare-and-set found another
revision; it carries what is stored now).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from modelwatch.errors import ModelwatchError
from modelwatch.state import UnitHistory


class ClusterError(ModelwatchError):
    """Something the cluster backend said or could not say; shared roots pause, never guess."""


class BackendUnavailable(ClusterError):
    """The backend cannot be reached, timed out or failed; the operation may be retried."""


class LeaseLost(ClusterError):
    """The lease is not this node's (any more): another node holds the root."""


class Conflict(ClusterError):
    """A compare-and-set found another revision of the unit; `current` is what is stored."""

    def __init__(self, unit: str, current: Stored | None) -> None:
        super().__init__(f"{unit}: changed in the cluster backend meanwhile")
        self.current = current


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease this node holds: `token` tells its own lease from an earlier one; `revision`
    is the backend's version of the lease record; `seconds` its length."""

    root: str
    node: str
    token: str
    seconds: float
    revision: int = 0


@dataclass(frozen=True, slots=True)
class Busy:
    """Another node holds the lease: `holder` (its node id, if readable), and how long the
    lease has left when the backend says (`remaining`, seconds)."""

    holder: str | None
    remaining: float | None = None


@dataclass(frozen=True, slots=True)
class Stored:
    """One unit as the backend stores it, at `revision` (0: never written)."""

    revision: int
    history: UnitHistory | None
    undelivered: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Write:
    """One compare-and-set of a unit: expected `revision`, the new history and undelivered
    ids, the body of a newly committed event (if any), and ids whose bodies can go."""

    unit: str
    revision: int
    history: UnitHistory | None
    undelivered: tuple[str, ...]
    event: tuple[str, bytes] | None = None
    forget: Sequence[str] = field(default_factory=tuple)


class Backend(Protocol):
    """A coordination service: Redis or NATS JetStream Key-Value (see the module docstring).

    Every method may raise `BackendUnavailable`; each returns within the backend's timeout.
    Methods are called from two threads (the coordinator's and the settle loop's).
    """

    name: str
    shown: str  # where it is, for logs and `status` (credentials masked)

    def acquire(self, root: str, node: str, seconds: float) -> Lease | Busy:
        """Take the root's lease if nobody holds it."""
        ...

    def renew(self, lease: Lease) -> Lease:
        """Extend our lease by its length from now; `LeaseLost` if it is not ours."""
        ...

    def release(self, lease: Lease) -> None:
        """Give the lease up at once (a clean stop), if it is still ours."""
        ...

    def holder(self, root: str) -> str | None:
        """The node id holding the root's lease now (None: nobody)."""
        ...

    def load(self, root: str) -> dict[str, Stored]:
        """Every unit of the root the backend knows, by unit path."""
        ...

    def commit(self, lease: Lease, write: Write) -> int:
        """Apply `write` if the unit is still at `write.revision` and `lease` still ours
        (where the backend can check both at once); returns the new revision. Raises
        `Conflict` (with what is stored now) or `LeaseLost`."""
        ...

    def events(self, root: str, ids: Collection[str]) -> Mapping[str, bytes]:
        """The stored bodies of those undelivered events (missing ones are left out)."""
        ...

    def close(self) -> None:
        """Close connections; the backend is not used afterwards."""
        ...

"""When to acquire, renew and give up a lease: pure decisions on times (SPEC §12).

A lease of `L` seconds is renewed every `L/3`. The backend starts a renewal's `L` when it
receives it, which is after the holder sent it, so the holder can rely on its lease until
`sent + L` at the earliest; it stops registering (**fences** itself) a margin before that,
at `sent + L - margin(L)`, with `margin(L) = max(1 s, L/5)`: a commit that starts before the
fence reaches the backend before any other node can have taken the lease, unless the network
delays it by more than the margin (and then the compare-and-set on the unit's revision still
keeps versions consistent; Redis also checks the lease in the same step as the write).

A standby tries again when the lease can have run out (Redis says how long it has left), and
otherwise every `min(1 s, L/3)`, so a dead holder is replaced within about `L + 1 s`.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelwatch.cluster.backend import Busy, Lease

MIN_MARGIN = 1.0
STANDBY_POLL = 1.0


def margin(seconds: float) -> float:
    return max(MIN_MARGIN, seconds / 5)


def renew_every(seconds: float) -> float:
    return seconds / 3


@dataclass(slots=True)
class RootLease:
    """What this node knows of one shared root's lease."""

    root: str
    lease: Lease | None = None  # ours, while we hold it
    valid_until: float = 0.0  # the fence: we register only before this
    next_attempt: float = 0.0
    holder: str | None = None  # another node holding it, when known
    failing_since: float | None = None  # first failed call of a run of failures
    last_error: str = ""

    def held(self, now: float) -> bool:
        """True while the lease is ours and before its fence."""
        return self.lease is not None and now < self.valid_until

    def due(self, now: float) -> bool:
        return now >= self.next_attempt

    def acquired(self, lease: Lease, sent_at: float) -> None:
        self.lease, self.holder = lease, lease.node
        self.renewed(lease, sent_at)

    def renewed(self, lease: Lease, sent_at: float) -> None:
        self.lease = lease
        self.valid_until = sent_at + lease.seconds - margin(lease.seconds)
        self.next_attempt = sent_at + renew_every(lease.seconds)
        self.failing_since, self.last_error = None, ""

    def busy(self, busy: Busy, now: float, seconds: float) -> None:
        """Another node holds it: try again when it can have run out."""
        self.lease, self.holder = None, busy.holder
        poll = min(STANDBY_POLL, renew_every(seconds))
        wait = poll if busy.remaining is None else min(busy.remaining + 0.05, renew_every(seconds))
        self.next_attempt = now + max(0.05, wait)
        self.failing_since, self.last_error = None, ""

    def failed(self, error: str, now: float, seconds: float) -> bool:
        """A call failed (backend unreachable); True when that ends our holding (the fence
        passed). Retried soon, well within the fence."""
        if self.failing_since is None:
            self.failing_since = now
        self.last_error = error
        self.next_attempt = now + min(STANDBY_POLL, renew_every(seconds) / 2)
        return self.fenced(now)

    def fenced(self, now: float) -> bool:
        """True when we held the lease and its fence has passed: it is given up here."""
        if self.lease is None or now < self.valid_until:
            return False
        self.lease = None
        return True

    def lost(self, now: float) -> None:
        """Another node has the lease now."""
        self.lease = None
        self.next_attempt = now

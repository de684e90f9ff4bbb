"""The settle state machine, driven with plain times (no sleeping)."""

from __future__ import annotations

from modelwatch.settle import Settler, Timing, Verdict

TIMING = Timing(settle_seconds=4.0, max_wait_seconds=60.0)


def make() -> Settler[str]:
    return Settler(lambda _unit: TIMING)


def test_nothing_is_due_before_half_the_quiet_period() -> None:
    """A freshly changed unit is not scanned before settle/2 has passed."""
    s = make()
    s.observe("u", 100.0)
    assert s.due(101.9) == []
    assert s.next_deadline() == 102.0
    assert s.due(102.0) == ["u"]


def test_two_equal_scans_at_the_end_of_the_quiet_period_settle() -> None:
    """Probe at settle/2, final at settle: equal stat keys mean STABLE."""
    s = make()
    s.observe("u", 100.0)
    assert s.scanned("u", "k1", 102.0) is Verdict.WAIT
    assert s.due(103.9) == []
    assert s.due(104.0) == ["u"]
    assert s.scanned("u", "k1", 104.0) is Verdict.STABLE
    assert s.settled("u", 104.0) == 4.0
    assert "u" not in s


def test_change_without_events_restarts_the_quiet_period() -> None:
    """A writer that produces no events (mmap, NFS) is caught by differing scans."""
    s = make()
    s.observe("u", 100.0)
    s.scanned("u", "k1", 102.0)
    assert s.scanned("u", "k2", 104.0) is Verdict.WAIT
    assert s.due(107.9) == []
    assert s.scanned("u", "k2", 108.0) is Verdict.STABLE


def test_an_event_discards_the_probe() -> None:
    """An event after the probe needs a fresh probe and a full quiet period."""
    s = make()
    s.observe("u", 100.0)
    s.scanned("u", "k1", 102.0)
    s.observe("u", 103.0)
    assert s.due(104.0) == []
    assert s.due(105.0) == ["u"]
    assert s.scanned("u", "k1", 105.0) is Verdict.WAIT
    assert s.scanned("u", "k1", 107.0) is Verdict.STABLE


def test_continuous_events_never_settle() -> None:
    """Changes every second keep a unit pending."""
    s = make()
    for t in range(100, 120):
        s.observe("u", float(t))
        assert s.due(float(t) + 0.5) == []


def test_not_ready_is_checked_again_a_quiet_period_later() -> None:
    """A stable but incomplete unit is rescanned without needing another event."""
    s = make()
    s.observe("u", 100.0)
    s.scanned("u", "k", 102.0)
    assert s.scanned("u", "k", 104.0) is Verdict.STABLE
    s.not_ready("u", "k", 104.0)
    assert s.due(107.0) == []
    assert s.due(108.0) == ["u"]
    assert s.scanned("u", "k", 108.0) is Verdict.STABLE


def test_overdue_is_reported_once_per_episode() -> None:
    """max_wait since the first change is reported once, and again after a new episode."""
    s = make()
    s.observe("u", 100.0)
    for t in range(101, 161):
        s.observe("u", float(t))
    assert s.overdue(159.0) == []
    assert s.overdue(160.0) == ["u"]
    assert s.overdue(170.0) == []
    s.observe("u", 171.0)
    s.scanned("u", "k", 173.0)
    s.scanned("u", "k", 175.0)
    s.settled("u", 175.0)
    s.observe("u", 200.0)
    assert s.overdue(259.9) == []
    assert s.overdue(260.0) == ["u"]


def test_next_deadline_covers_overdue() -> None:
    """The loop wakes for max_wait even when no scan is due."""
    s = Settler(lambda _u: Timing(settle_seconds=100.0, max_wait_seconds=10.0))
    s.observe("u", 0.0)
    assert s.next_deadline() == 10.0


def test_rechecks_back_off_once_past_max_wait() -> None:
    """A unit stuck incomplete past max_wait is re-checked less and less often."""
    s = Settler(lambda _u: Timing(settle_seconds=2.0, max_wait_seconds=10.0))
    s.observe("u", 0.0)
    s.scanned("u", "k", 1.0)
    assert s.scanned("u", "k", 2.0) is Verdict.STABLE
    s.not_ready("u", "k", 2.0)
    assert s.overdue(10.0) == ["u"]
    gaps, now = [], 2.0
    for _ in range(6):
        at = s.next_deadline()
        assert at is not None
        gaps.append(at - now)
        now = at
        assert s.scanned("u", "k", now) is Verdict.STABLE
        s.not_ready("u", "k", now)
    assert gaps[1:] == sorted(gaps[1:]) and gaps[-1] > 4 * gaps[1]
    assert all(g <= 2.0 + 300.0 for g in gaps)


def test_a_unit_being_checked_is_not_due_again() -> None:
    """While the pool checks a unit (busy), it is neither due nor a deadline; then it is."""
    s = make()
    s.observe("u", 100.0)
    s.set_busy("u", True)
    assert s.due(200.0) == [] and s.next_deadline() is None
    s.set_busy("u", False)
    assert s.due(200.0) == ["u"]


def test_last_chance_settles_a_unit_mid_quiet_period() -> None:
    """Stopping: a unit one second into a 4 s quiet period gets a probe now and a final scan
    `gap` later; equal scans are STABLE, whatever is left of the quiet period."""
    s = make()
    s.observe("u", 100.0)
    s.last_chance(101.0, gap=0.5)
    assert s.due(101.0) == ["u"]
    assert s.scanned("u", "k", 101.0) is Verdict.WAIT
    assert s.due(101.4) == [] and s.next_deadline() == 101.5
    assert s.scanned("u", "k", 101.5) is Verdict.STABLE
    assert s.settled("u", 101.5) == 1.5
    assert s.in_last_chance() == []


def test_last_chance_ends_on_a_change_or_when_not_ready() -> None:
    """A unit whose last two scans differ (CHANGED), or that is stable but not ready, is done:
    it stays pending for the next start and is never due again."""
    s = make()
    s.observe("growing", 100.0)
    s.observe("incomplete", 100.0)
    s.last_chance(101.0, gap=0.5)
    for unit in ("growing", "incomplete"):
        s.scanned(unit, "k1", 101.0)
    assert s.scanned("growing", "k2", 101.5) is Verdict.CHANGED
    assert s.scanned("incomplete", "k1", 101.5) is Verdict.STABLE
    s.not_ready("incomplete", "k1", 101.5)
    assert s.in_last_chance() == []
    assert sorted(s.pending()) == ["growing", "incomplete"]
    assert s.due(1000.0) == [] and s.overdue(1000.0) == []


def test_a_reload_that_shortens_the_quiet_period_takes_effect_for_pending_units() -> None:
    """`retime()` after a reload: a unit pending under a 4 s quiet period is due by the new
    timing, not the old one."""
    timing = {"t": TIMING}
    s: Settler[str] = Settler(lambda _unit: timing["t"])
    s.observe("u", 100.0)
    assert s.due(100.5) == []
    timing["t"] = Timing(settle_seconds=1.0, max_wait_seconds=60.0)
    s.retime()
    assert s.due(100.5) == ["u"]


def test_a_thousand_pending_units_cost_a_turn_little() -> None:
    """Only due units are touched: with 1,000 units waiting, asking who is due and when the
    next deadline is looks at the heap's top, not at every unit (counted, not timed)."""
    calls = {"n": 0}

    def timing(_unit: str) -> Timing:
        calls["n"] += 1
        return TIMING

    s: Settler[str] = Settler(timing)
    for i in range(1000):
        s.observe(f"u{i}", 100.0 + i)
    calls["n"] = 0
    for _ in range(100):
        assert s.due(101.0) == []
        assert s.next_deadline() == 102.0
    assert calls["n"] == 0

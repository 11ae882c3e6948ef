"""The circuit breaker's state machine by table: time is an argument."""

from __future__ import annotations

import pytest

from serve.routing.breaker import Breaker, State
from serve.routing.table import BreakerConfig

CFG = BreakerConfig(window_s=10, min_requests=4, error_rate=0.5, consecutive_failures=3,
                    open_s=5, half_open_probes=2)


def run(events: str, config: BreakerConfig = CFG) -> Breaker:
    """events: 'o' success, 'x' failure, one per second from t=0."""
    b = Breaker(config)
    for t, e in enumerate(events):
        assert b.allow(t)
        b.record(e == "o", t)
    return b


@pytest.mark.parametrize(("events", "state"), [
    ("", State.CLOSED),
    ("ooo", State.CLOSED),
    ("xx", State.CLOSED),            # two in a row: not yet
    ("xxx", State.OPEN),             # consecutive_failures
    ("xxox", State.OPEN),            # not in a row, but 3 of 4 (min_requests) failed
    ("oxox", State.OPEN),            # rate 0.5 at min_requests
    ("oxo", State.CLOSED),           # rate 0.33, too few outcomes anyway
    ("ooooooox", State.CLOSED),      # 1 of 8
])
def test_closed_to_open(events, state):
    assert run(events).state is state


def test_old_outcomes_leave_the_window():
    b = Breaker(CFG)
    for t in (0, 1):
        b.record(False, t)
    b.record(True, 2)
    # At t=20 the two early failures are out of the 10 s window: 1 failure of 2.
    b.record(True, 19)
    b.record(False, 20)
    b.record(True, 20)
    assert b.state is State.CLOSED


def test_open_refuses_until_open_s_then_probes_close_it():
    b = run("xxx")  # opened at t=2
    assert not b.allow(3) and not b.allow(6.9)
    assert b.allow(7) and b.state is State.HALF_OPEN  # probe 1
    assert b.allow(7)  # probe 2
    assert not b.allow(7)  # no third probe while two are out
    b.record(True, 7.5)
    assert b.state is State.HALF_OPEN
    b.record(True, 8)
    assert b.state is State.CLOSED
    assert b.allow(8)


def test_a_failed_probe_opens_it_again():
    b = run("xxx")
    assert b.allow(7)
    b.record(False, 7.2)
    assert b.state is State.OPEN and b.opened_at == 7.2
    assert not b.allow(12) and b.allow(12.3)


def test_closing_forgets_the_failures_before():
    b = run("xxx")
    for t in (7, 7):
        b.allow(t)
    b.record(True, 7)
    b.record(True, 7)
    b.record(False, 8)
    b.record(False, 8)
    assert b.state is State.CLOSED  # 2 in a row < 3, rate over 2 outcomes < min_requests


def test_outcomes_of_requests_let_through_before_it_opened_are_ignored():
    b = run("xxx")
    b.record(True, 2.5)
    assert b.state is State.OPEN

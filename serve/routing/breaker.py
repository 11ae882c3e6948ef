"""A circuit breaker per revision. Pure: time comes in as an argument.

closed -> open: `consecutive_failures` in a row, or `error_rate` of the window's
outcomes once there are `min_requests` of them. open -> half-open after `open_s`:
up to `half_open_probes` requests go through; that many successes in a row close
it, one failure opens it again.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from .table import BreakerConfig


class State(IntEnum):
    """Values as exported by imagegen_breaker_state."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state = State.CLOSED
        self.opened_at = 0.0
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._in_a_row = 0  # failures while closed, successes while half-open
        self._probes = 0  # half-open requests let through and not yet recorded

    def allow(self, now: float) -> bool:
        """May a request go to this revision now? A yes while half-open is a probe:
        record its outcome."""
        if self.state is State.OPEN and now - self.opened_at >= self.config.open_s:
            self.state, self._in_a_row, self._probes = State.HALF_OPEN, 0, 0
        if self.state is State.CLOSED:
            return True
        if self.state is State.HALF_OPEN and self._probes < self.config.half_open_probes:
            self._probes += 1
            return True
        return False

    def release(self) -> None:
        """A request let through ended without an outcome (cancelled, overloaded, bad
        input): give its probe slot back, or a half-open breaker would wait forever."""
        if self.state is State.HALF_OPEN:
            self._probes = max(0, self._probes - 1)

    def record(self, ok: bool, now: float) -> None:
        if self.state is State.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            if not ok:
                self._open(now)
            else:
                self._in_a_row += 1
                if self._in_a_row >= self.config.half_open_probes:
                    self.state, self._in_a_row = State.CLOSED, 0
                    self._outcomes.clear()
            return
        if self.state is State.OPEN:
            return  # a request let through before it opened
        self._outcomes.append((now, ok))
        while self._outcomes and self._outcomes[0][0] < now - self.config.window_s:
            self._outcomes.popleft()
        self._in_a_row = 0 if ok else self._in_a_row + 1
        failed = sum(not o for _, o in self._outcomes)
        if self._in_a_row >= self.config.consecutive_failures or (
            len(self._outcomes) >= self.config.min_requests
            and failed / len(self._outcomes) >= self.config.error_rate
        ):
            self._open(now)

    def _open(self, now: float) -> None:
        self.state, self.opened_at, self._in_a_row, self._probes = State.OPEN, now, 0, 0
        self._outcomes.clear()

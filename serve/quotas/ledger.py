"""The ledger: cost units reserved before any GPU work, committed on success,
refunded on failure, block or cancellation. One interface, two backends (SQLite:
one transaction per change; Redis: one Lua script per change on one hash-tagged
key per principal, time read from Redis), one contract suite
(tests/unit/test_ledger_contract.py).

Per principal: a token bucket (`burst`, refilled at `refill_per_s`), support
credits spent once the bucket is short, a UTC-day total against `daily`, the
month's committed volume (for progressive pricing) and the reservations held. A
reservation whose request died (an ingress killed mid-request) is refunded once
its hold expires, at the principal's next reserve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

EPSILON = 1e-9  # cost units are sums of float products: 10 x 0.004096 must fit 0.04096
HOLD_S = 600.0  # a reservation not committed or refunded by then is refunded
NEVER_S = 86400.0  # the retry delay when the bucket does not refill


@dataclass(frozen=True, slots=True)
class Budget:
    burst: float
    refill_per_s: float
    daily: float | None = None

    @classmethod
    def of(cls, plan) -> Budget:
        return cls(plan.bucket.burst, plan.bucket.refill_per_s, plan.daily_units)


@dataclass(frozen=True, slots=True)
class Reservation:
    principal: str
    id: str
    units: float
    budget: Budget  # settling refills the bucket as reserving did


@dataclass(frozen=True, slots=True)
class Admission:
    """A reserve's answer: `reservation` when admitted; else `reason` (bucket or
    daily) and `retry_after_s`. `remaining` and `reset_s` describe the bucket after
    it (the RateLimit header's r and t)."""

    reservation: Reservation | None
    remaining: float
    reset_s: float
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    tokens: float
    credits: float
    today: float
    month: float
    held: int


class Ledger(Protocol):
    async def reserve(self, principal: str, units: float, budget: Budget, *,
                      hold_s: float = HOLD_S) -> Admission: ...

    async def commit(self, reservation: Reservation,
                     units: float | None = None) -> float | None:
        """Keep `units` (at most the reserved; the rest goes back); the month's
        volume before it, or None when the reservation is gone (already settled)."""

    async def refund(self, reservation: Reservation) -> None:
        """Give the reserved units back; a no-op when already committed or refunded."""

    async def usage(self, principal: str, budget: Budget) -> Usage: ...

    async def grant(self, principal: str, units: float) -> float:
        """Add support credits; the balance after."""

    async def close(self) -> None: ...


def refilled(tokens: float, at: float, now: float, budget: Budget) -> float:
    return min(budget.burst, tokens + max(0.0, now - at) * budget.refill_per_s)


def seconds_to_full(tokens: float, budget: Budget) -> float:
    missing = budget.burst - tokens
    if missing <= EPSILON:
        return 0.0
    return NEVER_S if budget.refill_per_s <= 0 else missing / budget.refill_per_s


def seconds_to(units: float, tokens: float, credits: float, budget: Budget) -> float:
    """Until `units` fit in the bucket (credits count at once)."""
    short = units - tokens - credits
    if short <= EPSILON:
        return 0.0
    if budget.refill_per_s <= 0 or units - credits > budget.burst + EPSILON:
        return NEVER_S
    return short / budget.refill_per_s


def seconds_to_midnight(now: float) -> float:
    return 86400.0 - now % 86400.0


def day_of(now: float) -> int:
    return int(now // 86400)


def month_of(now: float) -> int:
    import time

    t = time.gmtime(now)
    return t.tm_year * 100 + t.tm_mon


def ceil_s(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def open_ledger(state_url: str) -> Ledger:
    from .keys import sqlite_path, state_backend

    if state_backend(state_url) == "sqlite":
        from .sqlite_backend import SQLiteLedger

        return SQLiteLedger(sqlite_path(state_url))
    from .redis_backend import RedisLedger

    return RedisLedger(state_url)

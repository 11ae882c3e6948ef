"""Fair admission: one principal's burst cannot fill an ingress replica's queue.
Each principal has at most `limit` requests in flight in this replica at once; the
next is 429 `rate_limited` at once (Retry-After: 1), before it holds any budget or
queue slot. Pure bookkeeping on the event loop: no lock needed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import RateLimited


class InFlight:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.counts: Counter[str] = Counter()

    @contextmanager
    def hold(self, principal: str | None) -> Iterator[None]:
        if principal is None or not self.limit:
            yield
            return
        if self.counts[principal] >= self.limit:
            raise RateLimited(f"{principal} already has {self.limit} requests in flight here "
                              "(its share of the queue); retry when one finishes",
                              details=[{"field": "principal", "type": "in_flight_limit"}])
        self.counts[principal] += 1
        try:
            yield
        finally:
            self.counts[principal] -= 1
            if not self.counts[principal]:
                del self.counts[principal]

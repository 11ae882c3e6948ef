"""Admission by counting what is in flight in this ingress replica, per key, each
key at most its limit; the next is refused at once, before it holds any budget or
queue slot. Two uses: a principal's fair share (one principal's burst cannot fill
the replica's queue: 429 `rate_limited`), and a revision's capacity (what its queue
holds plus what its running calls carry: beyond that 503 `overloaded`, in
microseconds, not after the budget round trip). Pure bookkeeping on the event loop:
no lock needed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from ..errors import ImagegenError, Overloaded, RateLimited


class InFlight:
    def __init__(self, limit: int | Mapping[str, int],
                 refuse: Callable[[str, int], ImagegenError]) -> None:
        # one limit for every key (0: none), or one per key (a key not named: none)
        self.limit = limit
        self.refuse = refuse
        self.counts: Counter[str] = Counter()

    def limit_of(self, key: str) -> int:
        return self.limit if isinstance(self.limit, int) else self.limit.get(key, 0)

    @contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        limit = 0 if key is None else self.limit_of(key)
        if not limit:
            yield
            return
        if self.counts[key] >= limit:
            raise self.refuse(key, limit)
        self.counts[key] += 1
        try:
            yield
        finally:
            self.counts[key] -= 1
            if not self.counts[key]:
                del self.counts[key]


def share_used(principal: str, limit: int) -> RateLimited:
    return RateLimited(f"{principal} already has {limit} requests in flight here (its share "
                       "of the queue); retry when one finishes",
                       details=[{"field": "principal", "type": "in_flight_limit"}])


def at_capacity(model: str, limit: int) -> Overloaded:
    return Overloaded(f"model {model} is at capacity ({limit} requests queued or running "
                      "here); retry shortly")

"""Closed forms for multi-server queues with Poisson arrivals: Erlang B/C, M/M/c
waits and response times, the Allen-Cunneen M/G/c correction, and a bulk-service
chain that models continuous batching. Pure float math; the planner builds on it.

Times are seconds, rates per second. A queue at or past saturation is not an
error: its waits are infinite (`WaitTail(1.0, 0.0)`), so a search over replica
counts can step through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace


def erlang_b(servers: int, offered_load: float) -> float:
    """Blocking probability of M/M/c/c with `offered_load` = lambda/mu erlangs."""
    _check(servers, offered_load)
    # The recursion B(k) = A B(k-1) / (k + A B(k-1)) stays in [0, 1]: no factorials,
    # no overflow, O(c); fine for c in the thousands.
    b = 1.0
    for k in range(1, servers + 1):
        b = offered_load * b / (k + offered_load * b)
    return b


def erlang_c(servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in M/M/c (1.0 at or past saturation)."""
    _check(servers, offered_load)
    if offered_load >= servers:
        return 1.0
    b = erlang_b(servers, offered_load)
    return b / (1.0 - offered_load / servers * (1.0 - b))


def _check(servers: int, offered_load: float) -> None:
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    if not offered_load >= 0:  # also rejects NaN
        raise ValueError(f"offered_load must be >= 0, got {offered_load}")


@dataclass(frozen=True, slots=True)
class WaitTail:
    """A wait that is 0 with probability 1 - p_wait, else exponential with `rate`.

    Exact for M/M/c (p_wait = Erlang C, rate = c mu - lambda) and for the bulk
    chain below; the M/G/c corrections keep the shape and rescale the rate.
    """

    p_wait: float
    rate: float

    @property
    def mean(self) -> float:
        if self.p_wait == 0:
            return 0.0
        return self.p_wait / self.rate if self.rate > 0 else math.inf

    def tail(self, t: float) -> float:
        """P(W > t)."""
        if t < 0:
            return 1.0
        return self.p_wait * math.exp(-self.rate * t) if self.rate > 0 else self.p_wait

    def quantile(self, q: float) -> float:
        if self.p_wait <= 1.0 - q:
            return 0.0
        if self.rate <= 0:
            return math.inf
        return math.log(self.p_wait / (1.0 - q)) / self.rate


UNSTABLE = WaitTail(1.0, 0.0)


@dataclass(frozen=True, slots=True)
class ServiceDist:
    """S = shift + one exponential phase drawn with probability p (rate r), or
    S = shift alone when there are no phases.

    `fit(mean, cv)` spans the cases we need with closed-form convolutions against
    an exponential wait: deterministic (cv 0), shifted exponential (0 < cv <= 1,
    exactly exponential at 1) and balanced-means hyperexponential (cv > 1).
    """

    shift: float
    phases: tuple[tuple[float, float], ...] = ()

    @classmethod
    def fit(cls, mean: float, cv: float) -> ServiceDist:
        if not (mean > 0 and cv >= 0):
            raise ValueError(f"service needs mean > 0 and cv >= 0, got mean={mean}, cv={cv}")
        if cv == 0:
            return cls(mean)
        if cv <= 1:
            return cls(mean * (1.0 - cv), ((1.0, 1.0 / (cv * mean)),))
        p = 0.5 * (1.0 + math.sqrt((cv * cv - 1.0) / (cv * cv + 1.0)))
        return cls(0.0, ((p, 2.0 * p / mean), (1.0 - p, 2.0 * (1.0 - p) / mean)))

    @property
    def mean(self) -> float:
        return self.shift + sum(p / r for p, r in self.phases)

    def tail(self, t: float) -> float:
        """P(S > t)."""
        u = t - self.shift
        if u < 0:
            return 1.0
        return sum(p * math.exp(-r * u) for p, r in self.phases)

    def tail_after_wait(self, t: float, rate: float) -> float:
        """P(E + S > t) for E exponential with `rate`, independent of S."""
        u = t - self.shift
        if u < 0:
            return 1.0
        if rate <= 0:
            return 1.0
        if not self.phases:
            return math.exp(-rate * u)
        return sum(p * _two_exp_tail(rate, r, u) for p, r in self.phases)


def _two_exp_tail(a: float, b: float, u: float) -> float:
    """P(Exp(a) + Exp(b) > u), u >= 0: (a e^-bu - b e^-au) / (a - b), written so
    that a -> b needs no special case (the limit is (1 + a u) e^-au)."""
    lo, hi = min(a, b), max(a, b)
    d = hi - lo
    if d == 0:
        return (1.0 + lo * u) * math.exp(-lo * u)
    return math.exp(-lo * u) * (1.0 - lo * math.expm1(-d * u) / d)


def response_tail(wait: WaitTail, service: ServiceDist, t: float) -> float:
    """P(W + S > t) with W and S independent."""
    return ((1.0 - wait.p_wait) * service.tail(t)
            + wait.p_wait * service.tail_after_wait(t, wait.rate))


def solve_quantile(tail: Callable[[float], float], q: float, scale: float) -> float:
    """The q-quantile of a distribution on [0, inf) given its tail P(X > t):
    bisection, starting from [0, scale] and doubling until it brackets."""
    if not 0 < q < 1:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    target = 1.0 - q
    if tail(0.0) <= target:
        return 0.0
    hi = scale if scale > 0 else 1.0
    while tail(hi) > target:
        hi *= 2.0
        if hi > 1e12:  # an unstable queue: the quantile does not exist
            return math.inf
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if tail(mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


# --- M/M/c -------------------------------------------------------------------


def mmc_wait(servers: int, arrival_rate: float, service_rate: float) -> WaitTail:
    """Exact waiting-time law of M/M/c: P(W > t) = C e^-(c mu - lambda) t."""
    if service_rate <= 0:
        raise ValueError(f"service_rate must be > 0, got {service_rate}")
    spare = servers * service_rate - arrival_rate
    if spare <= 0:
        return UNSTABLE
    return WaitTail(erlang_c(servers, arrival_rate / service_rate), spare)


def mmc_mean_wait(servers: int, arrival_rate: float, service_rate: float) -> float:
    return mmc_wait(servers, arrival_rate, service_rate).mean


def mmc_wait_quantile(servers: int, arrival_rate: float, service_rate: float, q: float) -> float:
    return mmc_wait(servers, arrival_rate, service_rate).quantile(q)


def mmc_response_tail(servers: int, arrival_rate: float, service_rate: float, t: float) -> float:
    """P(W + S > t) in M/M/c: the exact law of wait plus exponential service
    (a mixture of Exp(mu) and hypoexponential(c mu - lambda, mu))."""
    wait = mmc_wait(servers, arrival_rate, service_rate)
    return response_tail(wait, ServiceDist.fit(1.0 / service_rate, 1.0), t)


def mmc_response_quantile(
    servers: int, arrival_rate: float, service_rate: float, q: float
) -> float:
    """Response-time quantile of M/M/c. Not wait quantile + 1/mu: the sum of a
    wait and a service has its own law, solved here by bisection."""
    wait = mmc_wait(servers, arrival_rate, service_rate)
    service = ServiceDist.fit(1.0 / service_rate, 1.0)
    return solve_quantile(lambda t: response_tail(wait, service, t), q, service.mean)


# --- M/G/c and batching ------------------------------------------------------


def allen_cunneen_wait(
    servers: int, arrival_rate: float, mean_service_s: float, service_cv: float
) -> WaitTail:
    """M/G/c wait: M/M/c's probability of waiting, conditional wait scaled by
    (1 + cs^2) / 2 (Poisson arrivals). cs = 0 gives the usual M/D/c estimate."""
    base = mmc_wait(servers, arrival_rate, 1.0 / mean_service_s)
    if base.rate <= 0:
        return UNSTABLE
    return WaitTail(base.p_wait, base.rate * 2.0 / (1.0 + service_cv**2))


@dataclass(frozen=True, slots=True)
class BulkQueue:
    """Stationary state of the continuous-batching chain (see `bulk_queue`).

    `lone`: share of batches started by a request that found a free server (one
    request); the rest are taken from the queue, min(q, k) requests with q - 1
    geometric of ratio `ratio`. `mean_batch`: requests per batch; `busy`: mean
    busy servers.
    """

    stable: bool
    wait: WaitTail
    ratio: float
    lone: float
    batch_limit: float
    mean_batch: float
    busy: float

    def queued_sizes(self) -> list[tuple[float, float]]:
        """(probability, requests) of batches taken from the queue."""
        z, k = self.ratio, self.batch_limit
        whole = math.floor(k)
        sizes = [((1.0 - z) * z ** (q - 1), float(q)) for q in range(1, whole + 1)]
        sizes.append((z**whole, k))  # capped: more were queued than fit
        return [(p, b) for p, b in sizes if p > 0]

    def batch_sizes(self) -> list[tuple[float, float]]:
        """(probability, requests) over all batches."""
        queued = [((1.0 - self.lone) * p, b) for p, b in self.queued_sizes()]
        return [(self.lone, 1.0), *queued]

    def queued_batch(self) -> float:
        """Request-weighted size of a batch taken from the queue: the batch a
        waiting request ends up in (bigger batches hold more requests)."""
        sizes = self.queued_sizes()
        return sum(p * b * b for p, b in sizes) / sum(p * b for p, b in sizes)


def bulk_queue(
    servers: int, arrival_rate: float, service_rate: float, batch_limit: float
) -> BulkQueue:
    """c servers, Poisson arrivals, one shared FIFO queue; a free server takes up
    to `batch_limit` queued requests at once, a request finding a free server
    starts alone; every batch takes Exp(service_rate) whatever its size (the
    caller passes the rate of a mean batch: a mean-field approximation).

    Below c busy servers the chain is M/M/c's; with all busy the queue length is
    geometric with ratio z, the root in (0, 1) of lambda = c mu z (1 - z^K)/(1 - z),
    so a waiting request needs a geometric number of completions and its wait is
    exactly Exp(c mu (1 - z^K)). With K = 1, z = rho and this is M/M/c.
    """
    c, lam, mu, k = servers, arrival_rate, service_rate, batch_limit
    if k < 1 or mu <= 0:
        raise ValueError(f"need batch_limit >= 1 and service_rate > 0, got {k}, {mu}")
    if lam <= 0:
        return BulkQueue(True, WaitTail(0.0, 1.0), 0.0, 1.0, k, 1.0, 0.0)
    if lam >= c * mu * k:
        return BulkQueue(False, UNSTABLE, 1.0, 0.0, k, k, float(c))
    z = _bulk_ratio(lam / (c * mu), k)
    b = erlang_b(c, lam / mu)
    p_wait = b / (b + (1.0 - b) * (1.0 - z))
    wait = WaitTail(p_wait, c * mu * (1.0 - z**k))
    # Batches start at rate lambda (1 - P_wait) from idle (one request) and at rate
    # c mu P_wait z from the queue; together they carry lambda requests per second.
    alone, queued = lam * (1.0 - p_wait), c * mu * p_wait * z
    chain = BulkQueue(True, wait, z, alone / (alone + queued), k, 1.0, 0.0)
    # lambda / (alone + queued) for whole k; for fractional k (a continuation of
    # the chain) the sizes' own mean keeps batches and busy servers consistent.
    mean_batch = sum(p * b for p, b in chain.batch_sizes())
    return replace(chain, mean_batch=mean_batch, busy=lam / (mu * mean_batch))


def _bulk_ratio(load: float, k: float) -> float:
    """Root z in (0, 1) of z (1 - z^k)/(1 - z) = load, for load < k."""
    if k == 1:
        return load
    lo, hi = 0.0, 1.0
    for _ in range(100):  # the left side increases from 0 to k on (0, 1)
        z = 0.5 * (lo + hi)
        if z * -math.expm1(k * math.log(z)) / (1.0 - z) < load:
            lo = z
        else:
            hi = z
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)

"""Closed forms: Erlang B/C, M/M/c waits and response times, the service-time
family, Allen-Cunneen, and the bulk-service chain against a brute-force CTMC."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from autoscaling.queueing import (
    ServiceDist,
    WaitTail,
    allen_cunneen_wait,
    bulk_queue,
    erlang_b,
    erlang_c,
    mmc_mean_wait,
    mmc_response_quantile,
    mmc_response_tail,
    mmc_wait,
    mmc_wait_quantile,
    solve_quantile,
)


def erlang_c_direct(c: int, a: Fraction) -> Fraction:
    """The textbook sum, in exact arithmetic (independent of the recursion)."""
    below = sum(a**k / math.factorial(k) for k in range(c))
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (below + top)


@pytest.mark.parametrize(
    ("c", "a", "want"),
    [
        (1, Fraction(1, 2), 0.5),  # c = 1: C = rho
        (1, Fraction(9, 10), 0.9),
        (2, Fraction(1), 1 / 3),
        (3, Fraction(2), 4 / 9),
        (5, Fraction(4), 0.5541125541125541),
        (10, Fraction(8), 0.40918015079644354),
        (20, Fraction(15), 0.1604293874169236),
        (100, Fraction(90), 0.2169404809063664),
        (1000, Fraction(950), 0.06825341537714143),  # big c: no overflow
    ],
)
def test_erlang_c_table(c, a, want):
    got = erlang_c(c, float(a))
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx(float(erlang_c_direct(c, a)), rel=1e-12)


@pytest.mark.parametrize(("c", "a"), [(1, 1.0), (4, 4.0), (4, 7.5), (1000, 1000.0)])
def test_erlang_c_saturated_always_waits(c, a):
    assert erlang_c(c, a) == 1.0


@pytest.mark.parametrize("c", [1, 3, 500])
def test_erlang_c_without_load_never_waits(c):
    assert erlang_c(c, 0.0) == 0.0


@pytest.mark.parametrize(("c", "a", "want"), [(1, 1.0, 0.5), (1, 3.0, 0.75), (2, 1.0, 0.2)])
def test_erlang_b(c, a, want):
    assert erlang_b(c, a) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("c", "a"), [(0, 1.0), (-1, 1.0), (2, -0.1), (2, math.nan)])
def test_bad_arguments_rejected(c, a):
    with pytest.raises(ValueError):
        erlang_c(c, a)


# --- M/M/c ---------------------------------------------------------------------


@pytest.mark.parametrize(("lam", "mu"), [(0.5, 1.0), (9.0, 10.0), (3.0, 4.0)])
def test_mm1_closed_forms(lam, mu):
    rho = lam / mu
    assert mmc_mean_wait(1, lam, mu) == pytest.approx(rho / (mu - lam), rel=1e-12)
    # P(W > t) = rho e^-(mu - lambda) t
    assert mmc_wait_quantile(1, lam, mu, 0.95) == pytest.approx(
        math.log(rho / 0.05) / (mu - lam), rel=1e-12
    )
    # response time of M/M/1 is Exp(mu - lambda)
    for q in (0.5, 0.95, 0.99):
        assert mmc_response_quantile(1, lam, mu, q) == pytest.approx(
            -math.log(1 - q) / (mu - lam), rel=1e-9
        )


def response_tail_direct(c: int, lam: float, mu: float, t: float) -> float:
    """(1 - C) e^-mu t + C P(Exp(theta) + Exp(mu) > t), theta = c mu - lambda."""
    cc = float(erlang_c_direct(c, Fraction(lam / mu)))
    theta = c * mu - lam
    if theta == mu:
        both = (1 + mu * t) * math.exp(-mu * t)
    else:
        both = (theta * math.exp(-mu * t) - mu * math.exp(-theta * t)) / (theta - mu)
    return (1 - cc) * math.exp(-mu * t) + cc * both


@pytest.mark.parametrize(
    ("c", "lam", "mu"),
    [
        (2, 1.0, 1.0),  # theta == mu: the limit form
        (2, 1.5, 1.0),
        (4, 3.0, 1.0),
        (10, 8.0, 1.0),
        (10, 9.5, 1.0),
        (50, 45.0, 2.0),
    ],
)
@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_mmc_response_quantile_solves_exact_tail(c, lam, mu, q):
    t = mmc_response_quantile(c, lam, mu, q)
    assert response_tail_direct(c, lam, mu, t) == pytest.approx(1 - q, rel=1e-8)
    assert mmc_response_tail(c, lam, mu, t) == pytest.approx(1 - q, rel=1e-8)


@pytest.mark.parametrize(("c", "lam", "mu"), [(1, 0.5, 1.0), (4, 3.0, 1.0), (10, 8.0, 1.0)])
def test_response_quantile_is_not_wait_quantile_plus_mean_service(c, lam, mu):
    naive = mmc_wait_quantile(c, lam, mu, 0.95) + 1 / mu
    exact = mmc_response_quantile(c, lam, mu, 0.95)
    assert abs(exact - naive) / exact > 0.05


@pytest.mark.parametrize(("c", "lam", "mu"), [(1, 1.0, 1.0), (3, 3.5, 1.0)])
def test_unstable_mmc_waits_forever(c, lam, mu):
    assert mmc_mean_wait(c, lam, mu) == math.inf
    assert mmc_wait_quantile(c, lam, mu, 0.95) == math.inf
    assert mmc_response_quantile(c, lam, mu, 0.95) == math.inf


# --- service family and quantiles ---------------------------------------------------


def second_moment(d: ServiceDist) -> float:
    if not d.phases:
        return d.shift**2
    return sum(p * (d.shift**2 + 2 * d.shift / r + 2 / r**2) for p, r in d.phases)


@pytest.mark.parametrize("mean", [0.1, 3.0])
@pytest.mark.parametrize("cv", [0.0, 0.2, 0.5, 1.0, 1.5, 3.0])
def test_service_fit_keeps_mean_and_cv(mean, cv):
    d = ServiceDist.fit(mean, cv)
    assert d.mean == pytest.approx(mean, rel=1e-12)
    var = second_moment(d) - mean**2
    assert math.sqrt(max(var, 0.0)) / mean == pytest.approx(cv, rel=1e-9, abs=1e-12)


def test_service_fit_cv1_is_exponential():
    d = ServiceDist.fit(2.0, 1.0)
    for t in (0.0, 0.5, 3.0):
        assert d.tail(t) == pytest.approx(math.exp(-t / 2.0), rel=1e-12)


@pytest.mark.parametrize(("d", "rate", "t"), [(1.0, 2.0, 0.5), (1.0, 2.0, 1.7), (0.3, 5.0, 2.0)])
def test_deterministic_service_after_exponential_wait(d, rate, t):
    s = ServiceDist.fit(d, 0.0)
    want = 1.0 if t < d else math.exp(-rate * (t - d))
    assert s.tail_after_wait(t, rate) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("a", "b"), [(1.0, 1.0), (1.0, 1.0 + 1e-12), (1.0, 3.0), (5.0, 0.2)])
def test_two_exponentials_tail_matches_monte_carlo(a, b):
    rng = np.random.default_rng(0)
    sample = rng.exponential(1 / a, 400_000) + rng.exponential(1 / b, 400_000)
    s = ServiceDist.fit(1 / b, 1.0)
    for t in np.quantile(sample, [0.5, 0.9, 0.99]):
        assert s.tail_after_wait(float(t), a) == pytest.approx((sample > t).mean(), abs=3e-3)


@pytest.mark.parametrize("q", [0.0, 1.0, -0.5, 2.0])
def test_quantile_outside_unit_interval_rejected(q):
    with pytest.raises(ValueError, match="quantile"):
        solve_quantile(lambda t: math.exp(-t), q, 1.0)


@pytest.mark.parametrize(("q", "scale"), [(0.5, 1e-6), (0.99, 1e3), (0.95, 1.0)])
def test_solve_quantile_brackets_from_any_scale(q, scale):
    assert solve_quantile(lambda t: math.exp(-t), q, scale) == pytest.approx(
        -math.log(1 - q), rel=1e-9
    )


@pytest.mark.parametrize(("p", "q", "want"), [(0.04, 0.95, 0.0), (0.5, 0.5, 0.0)])
def test_wait_quantile_zero_when_most_never_wait(p, q, want):
    assert WaitTail(p, 1.0).quantile(q) == want


# --- M/G/c and the bulk chain -------------------------------------------------------


@pytest.mark.parametrize(("c", "lam", "s"), [(1, 0.5, 1.0), (4, 3.0, 1.0), (10, 16.0, 0.5)])
def test_allen_cunneen_reduces_to_mmc_and_halves_for_deterministic(c, lam, s):
    mmc = mmc_wait(c, lam, 1 / s)
    exp = allen_cunneen_wait(c, lam, s, 1.0)
    assert (exp.p_wait, exp.rate) == pytest.approx((mmc.p_wait, mmc.rate), rel=1e-12)
    assert allen_cunneen_wait(c, lam, s, 0.0).mean == pytest.approx(mmc.mean / 2, rel=1e-12)


@pytest.mark.parametrize(("c", "lam", "mu"), [(1, 0.5, 1.0), (3, 2.5, 1.0), (12, 10.0, 1.0)])
def test_bulk_chain_with_batch_one_is_mmc(c, lam, mu):
    chain = bulk_queue(c, lam, mu, 1)
    mmc = mmc_wait(c, lam, mu)
    assert chain.wait.p_wait == pytest.approx(mmc.p_wait, rel=1e-12)
    assert chain.wait.rate == pytest.approx(mmc.rate, rel=1e-12)
    assert chain.mean_batch == pytest.approx(1.0)
    assert chain.busy == pytest.approx(lam / mu, rel=1e-12)


def brute_force_chain(c: int, lam: float, mu: float, k: int, depth: int = 400):
    """Stationary law of the chain by solving its generator numerically: states
    0..c-1 busy servers, then (all busy, q queued) for q = 0..depth."""
    n = c + depth + 1
    gen = np.zeros((n, n))
    for i in range(c):  # i busy, empty queue
        gen[i, i + 1] += lam
        if i:
            gen[i, i - 1] += i * mu
    for q in range(depth + 1):
        s = c + q
        if q < depth:
            gen[s, s + 1] += lam
        gen[s, c - 1 if q == 0 else c + max(0, q - k)] += c * mu
    np.fill_diagonal(gen, -gen.sum(axis=1))
    a = np.vstack([gen.T, np.ones(n)])
    pi = np.linalg.lstsq(a, np.r_[np.zeros(n), 1.0], rcond=None)[0]
    queue = pi[c:]
    p_wait = queue.sum()
    # a request seeing q queued waits floor(q / k) + 1 completions at rate c mu
    mean_wait = sum(p * (q // k + 1) / (c * mu) for q, p in enumerate(queue))
    busy = sum(i * pi[i] for i in range(c)) + c * p_wait
    return p_wait, mean_wait, busy


@pytest.mark.parametrize(
    ("c", "lam", "mu", "k"),
    [(1, 2.0, 1.0, 4), (2, 3.0, 1.0, 2), (3, 5.0, 1.0, 3), (4, 10.0, 1.0, 8), (8, 7.0, 1.0, 2)],
)
def test_bulk_chain_matches_brute_force(c, lam, mu, k):
    chain = bulk_queue(c, lam, mu, k)
    p_wait, mean_wait, busy = brute_force_chain(c, lam, mu, k)
    assert chain.wait.p_wait == pytest.approx(p_wait, rel=1e-6)
    assert chain.wait.mean == pytest.approx(mean_wait, rel=1e-6)
    assert chain.busy == pytest.approx(busy, rel=1e-6)


@pytest.mark.parametrize(("c", "lam", "mu", "k"), [(2, 3.0, 1.0, 2), (4, 10.0, 1.0, 8),
                                                   (3, 1.0, 1.0, 5.5)])
def test_bulk_chain_batches_carry_every_request(c, lam, mu, k):
    chain = bulk_queue(c, lam, mu, k)
    sizes = chain.batch_sizes()
    assert sum(p for p, _ in sizes) == pytest.approx(1.0, rel=1e-12)
    assert sum(p * b for p, b in sizes) == pytest.approx(chain.mean_batch, rel=1e-12)
    assert max(b for _, b in sizes) <= k
    assert 1.0 <= chain.queued_batch() <= k


@pytest.mark.parametrize(("c", "lam", "mu", "k"), [(1, 4.0, 1.0, 4), (2, 17.0, 1.0, 8)])
def test_bulk_chain_beyond_full_batches_is_unstable(c, lam, mu, k):
    chain = bulk_queue(c, lam, mu, k)
    assert not chain.stable
    assert chain.wait.mean == math.inf

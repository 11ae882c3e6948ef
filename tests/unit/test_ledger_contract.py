"""The ledger's contract, run over every backend (SQLite file, a real redis-server, a
real three-node Redis Cluster): reserve, commit, refund, expiry, the daily cap,
credits, and exact admission under concurrency. Time is each backend's own clock
(Redis: TIME, of the node holding the quota), so refills are checked with margins,
never exact."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.quotas.ledger import NEVER_S, Budget, open_ledger

B = Budget(burst=10.0, refill_per_s=0.0)


def run(url, fn):
    async def body():
        ledger = open_ledger(url)
        try:
            return await fn(ledger)
        finally:
            await ledger.close()

    return asyncio.run(body())


def test_a_new_principal_starts_full_and_is_refused_past_the_burst(state_url):
    async def body(ledger):
        a = await ledger.reserve("alice", 6, B)
        b = await ledger.reserve("alice", 6, B)  # 4 left
        c = await ledger.reserve("bob", 6, B)  # someone else's bucket
        return a, b, c, await ledger.usage("alice", B)

    a, b, c, usage = run(state_url, body)
    assert a.reservation and a.remaining == pytest.approx(4)
    assert b.reservation is None and b.reason == "bucket" and b.retry_after_s == NEVER_S
    assert c.reservation is not None
    assert (usage.tokens, usage.today, usage.held) == (pytest.approx(4), pytest.approx(6), 1)


def test_refund_gives_back_commit_keeps_and_both_settle_once(state_url):
    async def body(ledger):
        r = (await ledger.reserve("alice", 6, B)).reservation
        await ledger.refund(r)
        await ledger.refund(r)  # no-op
        after_refund = await ledger.usage("alice", B)
        r = (await ledger.reserve("alice", 6, B)).reservation
        before = await ledger.commit(r, 4)  # 2 of the 6 go back
        again = await ledger.commit(r)  # no-op: already settled
        await ledger.refund(r)  # no-op
        return after_refund, before, again, await ledger.usage("alice", B)

    after_refund, before, again, usage = run(state_url, body)
    assert (after_refund.tokens, after_refund.today, after_refund.held) == (
        pytest.approx(10), pytest.approx(0), 0)
    assert before == 0 and again is None  # already settled: nothing more
    assert (usage.tokens, usage.today, usage.month, usage.held) == (
        pytest.approx(6), pytest.approx(4), pytest.approx(4), 0)


def test_the_bucket_refills_and_says_when(state_url):
    fast = Budget(burst=2.0, refill_per_s=20.0)

    async def body(ledger):
        assert (await ledger.reserve("alice", 2, fast)).reservation
        refused = await ledger.reserve("alice", 1, fast)
        await asyncio.sleep(refused.retry_after_s + 0.05)
        return refused, await ledger.reserve("alice", 1, fast)

    refused, later = run(state_url, body)
    assert refused.reason == "bucket" and 0 < refused.retry_after_s <= 0.05 + 1e-6
    assert refused.reset_s == pytest.approx(0.1, abs=0.05)
    assert later.reservation is not None


def test_the_daily_cap_refuses_until_midnight(state_url):
    daily = Budget(burst=100.0, refill_per_s=0.0, daily=5.0)

    async def body(ledger):
        assert (await ledger.reserve("alice", 3, daily)).reservation
        return await ledger.reserve("alice", 3, daily)

    refused = run(state_url, body)
    assert refused.reason == "daily"
    assert 0 < refused.retry_after_s <= 86400 - time.time() % 86400 + 1


def test_a_reservation_whose_request_died_is_refunded_after_its_hold(state_url):
    async def body(ledger):
        await ledger.reserve("alice", 8, B, hold_s=0.2)  # never settled
        blocked = await ledger.reserve("alice", 8, B)
        await asyncio.sleep(0.3)
        return blocked, await ledger.reserve("alice", 8, B)

    blocked, later = run(state_url, body)
    assert blocked.reservation is None and later.reservation is not None


def test_credits_are_spent_once_the_bucket_is_short(state_url):
    async def body(ledger):
        balance = await ledger.grant("alice", 5)
        r = await ledger.reserve("alice", 13, B)  # 10 from the bucket, 3 from credits
        usage = await ledger.usage("alice", B)
        await ledger.refund(r.reservation)
        return balance, r, usage, await ledger.usage("alice", B)

    balance, r, during, after = run(state_url, body)
    assert balance == 5 and r.reservation is not None
    assert (during.tokens, during.credits) == (pytest.approx(0), pytest.approx(2))
    assert (after.tokens, after.credits) == (pytest.approx(10), pytest.approx(5))


def test_fifty_concurrent_reserves_against_ten_units_admit_exactly_ten(state_url):
    unit = 0.004096  # one 64x64 image: sums of these must still fit exactly
    budget = Budget(burst=10 * unit, refill_per_s=0.0)

    async def body():
        ledgers = [open_ledger(state_url) for _ in range(2)]  # two clients, as two replicas
        try:
            got = await asyncio.gather(*(ledgers[i % 2].reserve("alice", unit, budget)
                                         for i in range(50)))
        finally:
            for ledger in ledgers:
                await ledger.close()
        return sum(a.reservation is not None for a in got)

    assert asyncio.run(body()) == 10


_RESERVER = """
import asyncio, sys
from serve.quotas.ledger import Budget, open_ledger
async def main():
    ledger = open_ledger(sys.argv[1])
    budget = Budget(burst=10.0, refill_per_s=0.0)
    got = await asyncio.gather(*(ledger.reserve("shared", 1.0, budget) for _ in range(30)))
    await ledger.close()
    print(sum(a.reservation is not None for a in got))
asyncio.run(main())
"""


def test_one_sqlite_file_shared_by_two_processes_stays_exact(tmp_path):
    import subprocess
    import sys

    url = f"sqlite://{tmp_path / 'state.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", _RESERVER, url], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    admitted = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(admitted) == 10, admitted


def test_a_partial_commit_pays_from_the_bucket_first_and_gives_credits_back(state_url):
    async def body(ledger):
        await ledger.commit((await ledger.reserve("alice", 8, B)).reservation)  # bucket: 2
        await ledger.grant("alice", 8)
        r = (await ledger.reserve("alice", 10, B)).reservation  # 2 bucket + 8 credits
        before = await ledger.commit(r, 2)  # a cheaper fallback served it
        gone = await ledger.commit(r, 2)
        return before, gone, await ledger.usage("alice", B)

    before, gone, usage = run(state_url, body)
    assert before == pytest.approx(8) and gone is None  # settled once; then nothing
    assert (usage.tokens, usage.credits) == (pytest.approx(0), pytest.approx(8))


@pytest.mark.parametrize("server", ["redis_server", "redis_cluster"])
def test_a_retried_redis_script_charges_once(request, server):
    from serve.quotas.redis_backend import RedisLedger, _quota_key

    server = request.getfixturevalue(server)
    server.flush()

    async def body():
        ledger = RedisLedger(server.url)
        try:
            args = [*ledger._budget_args(B), "6.0", -1, "600", "same-id", "1e-9"]
            for _ in range(2):  # as redis-py re-sends a call whose reply was lost
                await ledger._reserve(keys=[_quota_key("alice")], args=args)
            for gid in ("g1", "g1"):
                await ledger._grant(keys=[_quota_key("alice")], args=[gid, "5"])
            return await ledger.usage("alice", B)
        finally:
            await ledger.close()

    usage = asyncio.run(body())
    assert (usage.tokens, usage.today, usage.held, usage.credits) == (
        pytest.approx(4), pytest.approx(6), 1, pytest.approx(5))

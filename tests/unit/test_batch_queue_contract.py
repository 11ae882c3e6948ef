"""The batch queue's contract over every state store backend (the `state_url`
fixture: SQLite, Redis, a Redis Cluster): batches stored and counted, claims in
order and never shared, leases that expire and are reclaimed (time moved with `now`,
never slept), a result recorded exactly once, retries, the dead-letter queue
(replay, purge), cancel, a notification flag set once, counts that conserve, and a
batch drained by concurrent workers."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from serve.batch import Batch, open_queue
from serve.batch.queue import ITEM_STATES

T0 = 1_700_000_000.0


def run(url, fn, queues: int = 1):
    async def main():
        qs = [open_queue(url) for _ in range(queues)]
        try:
            return await fn(*qs)
        finally:
            for q in qs:
                await q.close()

    return asyncio.run(main())


def batch(bid: str, created: float = T0, principal: str = "alice", **extra) -> Batch:
    return Batch(id=bid, principal=principal, created=created, **extra)


def reqs(n: int) -> list[dict]:
    return [{"prompt": f"a fox {i}", "tier": "draft", "seed": i} for i in range(n)]


def zeros(**counts) -> dict[str, int]:
    return {s: 0 for s in ITEM_STATES} | counts


def test_create_get_list_items(state_url):
    async def body(q):
        ids = await q.create(batch("b1", webhook_url="https://hooks.example/x"), reqs(3))
        again = await q.create(batch("b1"), reqs(5))  # a retried create keeps the first
        await q.create(batch("b2", T0 + 1), reqs(1))
        await q.create(batch("b3", T0 + 2, principal="bob"), reqs(2))
        return (ids, again, await q.get("b1"), await q.get("nope"), await q.list("alice"),
                await q.list("alice", limit=1), await q.items("b1"),
                await q.items("b1", state="leased"), await q.items("nope"))

    ids, again, got, missing, listed, one, items, leased, none = run(state_url, body)
    assert ids == again == ["b1-000000", "b1-000001", "b1-000002"]
    assert got == batch("b1", webhook_url="https://hooks.example/x", counts=zeros(pending=3))
    assert missing is None and leased == [] and none == []
    assert [b.id for b in listed] == ["b2", "b1"] and [b.id for b in one] == ["b2"]
    assert [(i.id, i.index, i.request, i.state, i.not_before, i.attempts) for i in items] == [
        (ids[n], n, reqs(3)[n], "pending", T0, 0) for n in range(3)]


def test_an_empty_batch_is_refused(state_url):
    async def body(q):
        with pytest.raises(ValueError):
            await q.create(batch("b1"), [])
        return await q.get("b1")

    assert run(state_url, body) is None


def test_a_limit_or_lease_below_one_is_refused(state_url):
    async def body(q):
        await q.create(batch("b1"), reqs(2))
        for call in (q.claim("w1", 10, 0), q.claim("w1", 0, 1), q.list("alice", 0),
                     q.dead(0)):
            with pytest.raises(ValueError):
                await call
        return await q.depth()

    assert run(state_url, body) == {"pending": 2, "waiting": 0, "leased": 0, "dead": 0}


def test_claim_takes_the_oldest_first_up_to_the_limit(state_url):
    async def body(q):
        await q.create(batch("late", T0 + 5), reqs(2))
        await q.create(batch("early", T0), reqs(3))
        await q.create(batch("future", T0 + 100), reqs(1))
        first = await q.claim("w1", 30, 4, now=T0 + 10)
        second = await q.claim("w2", 30, 4, now=T0 + 10)  # "future" is not due
        return (first, second, await q.claim("w2", 30, 4, now=T0 + 10),
                await q.depth(now=T0 + 10))

    first, second, third, depth = run(state_url, body)
    assert [i.id for i in first] == ["early-000000", "early-000001", "early-000002",
                                     "late-000000"]
    assert all(i.state == "leased" and i.lease_until == T0 + 40 for i in first)
    assert all(i.lease_owner.startswith("w1:") for i in first)
    assert len({i.lease_owner for i in first}) == 4  # a fresh token per item
    assert [i.id for i in second] == ["late-000001"] and third == []
    assert depth == {"pending": 0, "waiting": 1, "leased": 5, "dead": 0}  # "future" not due


def test_two_concurrent_claimers_never_share_an_item(state_url):
    async def body(a, b):
        await a.create(batch("b1"), reqs(120))
        got = await asyncio.gather(*(q.claim(f"w{n}", 30, 3, now=T0 + 1)
                                     for n in range(30) for q in (a, b)))
        return [i.id for claimed in got for i in claimed], await a.get("b1")

    ids, got = run(state_url, body, queues=2)
    assert len(ids) == len(set(ids)) == 120
    assert got.counts == zeros(leased=120)


def test_an_expired_lease_is_reclaimed_and_the_old_owner_loses_it(state_url):
    async def body(q):
        await q.create(batch("b1"), reqs(1))
        [old] = await q.claim("w1", 10, 1, now=T0)
        early = await q.claim("w2", 10, 1, now=T0 + 10)  # lease_until is not yet past
        [new] = await q.claim("w2", 10, 1, now=T0 + 10.5)
        lost = (await q.complete(old.id, old.lease_owner, {"by": "w1"}, now=T0 + 11),
                await q.fail(old.id, old.lease_owner, "x", None, now=T0 + 11),
                await q.renew(old.id, old.lease_owner, 10, now=T0 + 11))
        held = await q.items("b1")
        done = await q.complete(new.id, new.lease_owner, {"by": "w2"}, now=T0 + 12)
        return early, old, new, lost, held, done, await q.items("b1")

    early, old, new, lost, held, done, [item] = run(state_url, body)
    assert early == [] and new.id == old.id and new.lease_owner != old.lease_owner
    assert new.lease_owner.startswith("w2:") and new.attempts == 1
    assert new.last_error == f"lease expired: {old.lease_owner}"
    assert lost == (False, None, False)
    assert [(i.state, i.result) for i in held] == [("leased", None)]  # nothing recorded
    assert done and (item.state, item.result, item.lease_until) == (
        "succeeded", {"by": "w2"}, None)


def test_renew_keeps_the_lease_from_expiring(state_url):
    async def body(q):
        await q.create(batch("b1"), reqs(1))
        [it] = await q.claim("w1", 10, 1, now=T0)
        renewed = await q.renew(it.id, it.lease_owner, 10, now=T0 + 8)
        stolen = await q.claim("w2", 10, 1, now=T0 + 15)
        return renewed, stolen, await q.items("b1"), await q.claim("w2", 10, 1, now=T0 + 18.5)

    renewed, stolen, [item], later = run(state_url, body)
    assert renewed and stolen == [] and item.lease_until == T0 + 18
    assert [i.id for i in later] == [item.id]


def test_a_result_is_recorded_exactly_once(state_url):
    async def body(q):
        await q.create(batch("b1"), reqs(1))
        [it] = await q.claim("w1", 10, 1, now=T0)
        first = await q.complete(it.id, it.lease_owner, {"n": 1}, now=T0 + 1)
        repeat = await q.complete(it.id, it.lease_owner, {"n": 2}, now=T0 + 2)  # a retry
        stranger = await q.complete(it.id, "w9:nope", {"n": 3}, now=T0 + 2)
        failed = await q.fail(it.id, it.lease_owner, "late", None, now=T0 + 3)
        return (first, repeat, stranger, failed, await q.items("b1"), await q.get("b1"),
                await q.claim("w2", 10, 1, now=T0 + 100), await q.complete("nope", "x", {}))

    first, repeat, stranger, failed, [item], got, claimed, missing = run(state_url, body)
    assert (first, repeat, stranger, failed, missing) == (True, True, False, None, False)
    assert (item.state, item.result, item.updated) == ("succeeded", {"n": 1}, T0 + 1)
    assert claimed == [] and got.state == "completed" and got.counts == zeros(succeeded=1)


def test_fail_with_a_retry_is_pending_again_but_not_before_its_time(state_url):
    async def body(q):
        await q.create(batch("b1"), reqs(1))
        [it] = await q.claim("w1", 10, 1, now=T0)
        state = await q.fail(it.id, it.lease_owner, "oom", T0 + 60, now=T0 + 1)
        repeat = await q.fail(it.id, it.lease_owner, "oom", T0 + 60, now=T0 + 1)
        items = await q.items("b1")
        early = await q.claim("w1", 10, 1, now=T0 + 59.9)
        return state, repeat, items, early, await q.claim("w2", 10, 1, now=T0 + 60)

    state, repeat, [item], early, [again] = run(state_url, body)
    assert state == repeat == "pending"
    assert (item.state, item.attempts, item.last_error, item.not_before, item.lease_until) == (
        "pending", 1, "oom", T0 + 60, None)
    assert early == [] and again.id == item.id and again.attempts == 1


def test_fail_without_a_retry_is_dead_then_replayed_or_purged(state_url):
    async def body(q):
        await q.create(batch("b1"), reqs(3))
        claimed = await q.claim("w1", 10, 3, now=T0)
        states = [await q.fail(i.id, i.lease_owner, f"bad {i.index}", None, now=T0 + 1 + i.index)
                  for i in claimed]
        dead = await q.dead()
        replayed = await q.replay([claimed[0].id, claimed[0].id, "nope"], now=T0 + 10)
        purged = await q.purge([claimed[1].id, claimed[0].id])  # the first is no longer dead
        return (states, dead, replayed, purged, await q.dead(), await q.items("b1"),
                await q.get("b1"), await q.claim("w2", 10, 5, now=T0 + 10),
                await q.replay([claimed[1].id]))

    states, dead, replayed, purged, left, items, got, again, unpurged = run(state_url, body)
    assert states == ["dead"] * 3
    assert [(i.id, i.last_error, i.attempts) for i in dead] == [
        (f"b1-00000{n}", f"bad {n}", 1) for n in range(3)]
    assert (replayed, purged, unpurged) == (1, 1, 0)
    assert [i.id for i in left] == ["b1-000002"]
    assert [(i.state, i.attempts) for i in items] == [("pending", 0), ("purged", 1),
                                                      ("dead", 1)]
    assert items[0].not_before == T0 + 10 and items[0].last_error == "bad 0"
    assert got.counts == zeros(pending=1, purged=1, dead=1) and got.state == "running"
    assert [i.id for i in again] == ["b1-000000"]


def test_cancel_ends_pending_items_and_leased_ones_finish(state_url):
    async def body(q):
        await q.create(batch("b1"), reqs(5))
        a, b, _ = await q.claim("w1", 10, 3, now=T0)
        cancelled = await q.cancel("b1", now=T0 + 1)
        done = await q.complete(a.id, a.lease_owner, {"ok": True}, now=T0 + 2)
        retried = await q.fail(b.id, b.lease_owner, "oom", T0 + 3, now=T0 + 2)
        # c's worker dies: its lease expires, and a claim ends it rather than run it
        claimed = await q.claim("w2", 10, 5, now=T0 + 20)
        return (cancelled, done, retried, claimed, await q.get("b1"), await q.items("b1"),
                await q.cancel("b1"), await q.cancel("nope"), await q.depth())

    cancelled, done, retried, claimed, got, items, twice, missing, depth = run(state_url, body)
    assert cancelled == 2 and done and retried == "cancelled" and claimed == []
    assert got.state == "cancelled" and got.counts == zeros(succeeded=1, cancelled=4)
    assert [i.state for i in items] == ["succeeded", "cancelled", "cancelled", "cancelled",
                                        "cancelled"]
    assert (twice, missing) == (0, 0)
    assert depth == {"pending": 0, "waiting": 0, "leased": 0, "dead": 0}


def test_cancelling_a_finished_batch_changes_nothing(state_url):
    async def body(q):
        await q.create(batch("b1"), reqs(1))
        [it] = await q.claim("w1", 10, 1, now=T0)
        await q.complete(it.id, it.lease_owner, {}, now=T0)
        return await q.cancel("b1"), await q.get("b1")

    n, got = run(state_url, body)
    assert n == 0 and got.state == "completed"


def test_notify_once_is_true_for_the_first_caller_only(state_url):
    async def body(a, b):
        await a.create(batch("b1"), reqs(1))
        await a.create(batch("b2"), reqs(1))
        racing = await asyncio.gather(*(q.notify_once("b1") for _ in range(20) for q in (a, b)))
        return (racing, await a.notify_once("b1"), await b.notify_once("b2"),
                await a.notify_once("nope"), await a.get("nope"), await a.get("b1"))

    racing, again, other, missing, created, got = run(state_url, body, queues=2)
    assert sorted(racing) == [False] * 39 + [True] and again is False
    assert other is True and missing is False and created is None  # no batch made
    assert got == batch("b1", counts=zeros(pending=1))


def test_counts_conserve_over_a_random_mix_of_operations(state_url):
    rng = random.Random(7)

    async def body(q):
        await q.create(batch("b1"), reqs(40))
        await q.create(batch("b2", T0 + 1), reqs(25))
        now, held = T0, []
        for _ in range(150):
            now += rng.uniform(0, 4)
            op = rng.random()
            if op < 0.3:
                held += await q.claim(f"w{rng.randrange(3)}", 5, rng.randint(1, 4), now=now)
            elif op < 0.75 and held:
                it = held.pop(rng.randrange(len(held)))
                kind = rng.random()
                if kind < 0.5:
                    await q.complete(it.id, it.lease_owner, {"at": now}, now=now)
                elif kind < 0.8:
                    await q.fail(it.id, it.lease_owner, "flaky", now + rng.uniform(0, 5),
                                 now=now)
                else:
                    await q.fail(it.id, it.lease_owner, "bad", None, now=now)
            elif op < 0.85:
                dead = await q.dead()
                if dead:
                    pick = [i.id for i in rng.sample(dead, rng.randint(1, len(dead)))]
                    await (q.replay if rng.random() < 0.6 else q.purge)(pick, now=now)
            elif op < 0.87:
                await q.cancel(rng.choice(["b1", "b2"]), now=now)
        return ([await q.get(b) for b in ("b1", "b2")],
                [await q.items(b) for b in ("b1", "b2")], await q.depth())

    batches, items, depth = run(state_url, body)
    for b, its, n in zip(batches, items, (40, 25), strict=True):
        assert sum(b.counts.values()) == n == len(its)
        assert b.counts == zeros(**Counter(i.state for i in its))
    every = Counter(i.state for its in items for i in its)
    assert depth["pending"] + depth["waiting"] == every["pending"]
    assert (depth["leased"], depth["dead"]) == (every["leased"], every["dead"])
    assert all((i.lease_until is not None) == (i.state == "leased") for its in items
               for i in its)


def test_three_workers_drain_a_500_item_batch_exactly_once(state_url):
    async def worker(q, name: str, done: list):
        while True:
            claimed = await q.claim(name, 30, 10)
            if not claimed:
                depth = await q.depth()
                if depth["pending"] == depth["leased"] == 0:
                    return
                await asyncio.sleep(0.01)
                continue
            for it in claimed:
                if it.index % 7 == 0 and it.attempts == 0:  # a transient error, retried now
                    assert await q.fail(it.id, it.lease_owner, "transient", 0.0) == "pending"
                elif await q.complete(it.id, it.lease_owner, {"by": name, "i": it.index}):
                    done.append(it.id)

    async def body(*qs):
        await qs[0].create(batch("big"), reqs(500))
        done: list[str] = []
        await asyncio.gather(*(worker(q, f"w{n}", done) for n, q in enumerate(qs)))
        return done, await qs[0].get("big"), await qs[0].items("big")

    done, got, items = run(state_url, body, queues=3)
    assert len(done) == len(set(done)) == 500
    assert got.state == "completed" and got.counts == zeros(succeeded=500)
    assert all(i.result["i"] == i.index and i.attempts == (i.index % 7 == 0) for i in items)

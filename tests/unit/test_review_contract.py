"""The review queue's contract over every state store backend (the `state_url`
fixture: SQLite, Redis, a Redis Cluster): items kept whole, listed oldest first by
status, restricted ones apart, decisions recorded (a later one replaces), appeals
only by the blocked principal, concurrent updates all kept."""

from __future__ import annotations

import asyncio
import datetime as dt

from serve.safety.review import Appeal, Decision, new_item, open_review, sha256


def run(url, fn):
    async def main():
        store = open_review(url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def item(request_id: str, **extra):
    fields = {"stage": "prompt_safety", "category": "sexual", "reason": "sexual_content",
              "field": "prompt", "principal": "alice", "request_id": request_id,
              "prompt_sha256": sha256("p"), "negative_prompt_sha256": sha256("")} | extra
    return new_item(**fields)


def now():
    return dt.datetime.now(dt.UTC)


def test_items_are_kept_whole_and_listed_by_status(state_url):
    a, b = item("r1"), item("r2", template="product-shot@1", prompt="kept")
    minors = item("r3", category="sexual_minors", reason="csam", restricted=True)

    async def body(s):
        for i in (a, b, minors):
            await s.add(i)
        await s.add(a)  # a retried add keeps one
        return (await s.get(a.id), await s.list(), await s.list(restricted=True),
                await s.get("nope"))

    got, listed, restricted, missing = run(state_url, body)
    assert got == a and missing is None
    assert [i.id for i in listed] == [a.id, b.id]  # oldest first, restricted apart
    assert [i.id for i in restricted] == [minors.id]


def test_a_decision_is_recorded_and_a_later_one_replaces_it(state_url):
    a = item("r1")
    d1 = Decision(decision="rejected", reason="true_positive", by="rita", at=now())
    d2 = Decision(decision="approved", reason="false_positive_allowlist", by="sam", at=now())

    async def body(s):
        await s.add(a)
        first = await s.decide(a.id, d1)
        opened = await s.list()
        second = await s.decide(a.id, d2)
        return first, opened, second, await s.list(status="approved"), await s.decide("x", d1)

    first, opened, second, approved, missing = run(state_url, body)
    assert (first.status, first.decision) == ("rejected", d1) and opened == []
    assert (second.status, second.decision.by) == ("approved", "sam")
    assert [i.id for i in approved] == [a.id] and missing is None


def test_only_the_blocked_principal_appeals_and_every_appeal_is_kept(state_url):
    a = item("r1")

    async def body(s):
        await s.add(a)
        stranger = await s.appeal("r1", Appeal(at=now(), principal="mallory", message="mine"))
        nobody = await s.appeal("r9", Appeal(at=now(), principal="alice", message="x"))
        await asyncio.gather(*(s.appeal("r1", Appeal(at=now(), principal="alice",
                                                     message=f"appeal {i}"))
                               for i in range(5)))
        return stranger, nobody, await s.get(a.id)

    stranger, nobody, got = run(state_url, body)
    assert stranger is None and nobody is None
    assert sorted(x.message for x in got.appeals) == [f"appeal {i}" for i in range(5)]

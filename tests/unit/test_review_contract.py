"""The review queue's contract over every state store backend (the `state_url`
fixture: SQLite, Redis, a Redis Cluster): items kept whole, listed oldest first by
status, restricted ones apart, decisions recorded (a later one replaces), appeals
only by the blocked principal, concurrent updates all kept, an image case's evidence
kept with it byte for byte."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib

import numpy as np

from serve.imaging import encode_png
from serve.safety.review import Appeal, Decision, FlaggedImage, new_item, open_review, sha256


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


def png(seed: int) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8))


def image_case(request_id: str, evidence: dict[int, bytes]):
    shots = [FlaggedImage(index=i, action="blur", category="sexual", score=0.9,
                          scores={"sexual": 0.9}, sha256=hashlib.sha256(b).hexdigest(),
                          width=8, height=6) for i, b in evidence.items()]
    return item(request_id, kind="image", stage="image_safety", field="images",
                images=shots, classifier="fake")


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


def test_evidence_is_kept_with_its_item_byte_for_byte(state_url):
    evidence = {0: png(0), 2: png(2)}
    case, plain = image_case("r1", evidence), item("r2")

    async def body(s):
        await s.add(case, evidence)
        await s.add(plain)
        return ({i: await s.evidence(case.id, i) for i in (0, 1, 2)},
                await s.evidence("nope", 0), await s.evidence(plain.id, 0), await s.get(case.id))

    got, missing_item, no_evidence, kept = run(state_url, body)
    assert got == {0: evidence[0], 1: None, 2: evidence[2]}  # a missing index: None
    assert missing_item is None and no_evidence is None
    assert [hashlib.sha256(got[i.index]).hexdigest() for i in kept.images] == [
        i.sha256 for i in kept.images]


def test_a_retried_add_keeps_the_first_evidence(state_url):
    first = {0: png(0)}
    case = image_case("r1", first)

    async def body(s):
        await s.add(case, first)
        await s.add(case, {0: png(9), 1: png(8)})
        return await s.evidence(case.id, 0), await s.evidence(case.id, 1)

    assert run(state_url, body) == (first[0], None)  # a retry adds no evidence either

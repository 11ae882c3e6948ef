"""Idempotency keys' contract, run over every state store backend (the `state_url`
fixture): a key is claimed once, a retry by its owner finds its own claim, another
request finds it running, a finished one replays its answer, another body with the
same key is a mismatch, a failure frees it, and a claim whose request died expires."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.errors import InvalidRequest
from serve.quotas.idempotency import fingerprint, open_replays, valid_key

FP, OTHER = fingerprint('{"prompt":"a fox"}'), fingerprint('{"prompt":"a hen"}')


def run(url, fn):
    async def main():
        store = open_replays(url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_a_key_runs_once_and_then_replays_its_answer(state_url):
    async def body(s):
        first = await s.claim("alice", "k1", FP, "req-1")
        retried = await s.claim("alice", "k1", FP, "req-1")  # its own call, retried
        meanwhile = await s.claim("alice", "k1", FP, "req-2")
        await s.complete("alice", "k1", "req-1", '{"id": "req-1"}')
        later = await s.claim("alice", "k1", FP, "req-3")
        await s.release("alice", "k1", "req-3")  # not its claim: nothing happens
        await s.release("alice", "k1", "req-1")  # done: a release never drops an answer
        return first, retried, meanwhile, later, await s.claim("alice", "k1", FP, "req-4")

    first, retried, meanwhile, later, still = run(state_url, body)
    assert (first.state, retried.state, meanwhile.state) == ("new", "new", "running")
    assert later.state == still.state == "done" and later.answer == '{"id": "req-1"}'


def test_another_body_under_the_same_key_is_a_mismatch_and_keys_are_per_principal(state_url):
    async def body(s):
        await s.claim("alice", "k1", FP, "req-1")
        return (await s.claim("alice", "k1", OTHER, "req-2"),
                await s.claim("bob", "k1", OTHER, "req-3"))

    mismatch, bobs = run(state_url, body)
    assert mismatch.state == "mismatch" and mismatch.answer is None
    assert bobs.state == "new"  # bob's k1 is not alice's


def test_a_failed_request_frees_its_key(state_url):
    async def body(s):
        await s.claim("alice", "k1", FP, "req-1")
        await s.release("alice", "k1", "req-1")
        return await s.claim("alice", "k1", OTHER, "req-2")

    assert run(state_url, body).state == "new"  # even with another body: nothing was kept


def test_a_claim_whose_request_died_expires_and_an_answer_after_its_keep(state_url):
    async def body(s):
        await s.claim("alice", "k1", FP, "req-1", lease_s=1)
        await s.claim("alice", "k2", FP, "req-1")
        await s.complete("alice", "k2", "req-1", "{}", keep_s=1)
        held = await s.claim("alice", "k1", FP, "req-2")
        await asyncio.sleep(2.1)  # Redis expires keys by whole seconds
        return (held, await s.claim("alice", "k1", FP, "req-2"),
                await s.claim("alice", "k2", FP, "req-3"))

    t = time.monotonic()
    held, expired, forgotten = run(state_url, body)
    assert held.state == "running"
    assert expired.state == "new" and forgotten.state == "new"
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("key", ["", "has space", "é", "x" * 256, "tab\there"])
def test_a_malformed_key_is_refused(key):
    with pytest.raises(InvalidRequest) as e:
        valid_key(key)
    assert e.value.details[0]["field"] == "Idempotency-Key"


def test_a_uuid_is_a_key():
    assert valid_key("3f2b6c1e-8e0a-4d6b-9a57-5b1f6d2c7e90")


def test_sqlite_purges_every_principals_expired_answers(tmp_path):
    import sqlite3

    url = f"sqlite://{tmp_path / 'state.db'}"

    async def body(s):
        await s.claim("alice", "k1", FP, "a")
        await s.complete("alice", "k1", "a", "x" * 1000, keep_s=0.01)
        await asyncio.sleep(0.05)
        s._purged = 0.0  # a minute has passed
        await s.claim("bob", "k9", FP, "b")

    run(url, body)
    rows = sqlite3.connect(tmp_path / "state.db").execute(
        "SELECT principal FROM idempotency").fetchall()
    assert rows == [("bob",)]  # alice never came back, her answer is gone

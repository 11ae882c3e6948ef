"""The state store's contract, run over every backend: the embedded SQLite file, a
real redis-server and a real three-node Redis Cluster (tests/conftest.py). A backend
that passes is interchangeable."""

from __future__ import annotations

import asyncio

import pytest

from serve.errors import StateUnavailable
from serve.quotas.keys import KeyExists, open_keys
from serve.quotas.principals import key_hash, new_key, record_for


def run(coro):
    return asyncio.run(coro)


async def _with(url, fn):
    store = open_keys(url)
    try:
        return await fn(store)
    finally:
        await store.close()


def test_a_key_is_found_by_its_hash_only(state_url):
    key_id, key = new_key()
    rec = record_for(key, key_id, "alice", ("user", "reviewer"), "team-a")

    async def body(store):
        await store.add(rec)
        return await store.find(key_hash(key)), await store.find(key_hash(key + "x"))

    found, other = run(_with(state_url, body))
    assert found == rec and other is None
    assert key not in found.model_dump_json()  # only the hash is stored


def test_an_id_or_hash_taken_is_refused(state_url):
    key_id, key = new_key()

    async def body(store):
        await store.add(record_for(key, key_id, "alice"))
        for clash in (record_for(new_key()[1], key_id, "bob"), record_for(key, "0" * 12, "bob")):
            with pytest.raises(KeyExists):
                await store.add(clash)
        return await store.list()

    assert [r.principal for r in run(_with(state_url, body))] == ["alice"]


def test_revoke_marks_the_key_and_is_idempotent(state_url):
    key_id, key = new_key()

    async def body(store):
        await store.add(record_for(key, key_id, "alice"))
        first = await store.revoke(key_id)
        when = (await store.find(key_hash(key))).revoked
        again = await store.revoke(key_id)
        return first, when, again, (await store.find(key_hash(key))).revoked, \
            await store.revoke("nokeyhere000")

    first, when, again, still, unknown = run(_with(state_url, body))
    assert first and again and not unknown
    assert when is not None and still == when  # a second revoke keeps the first time


def test_list_is_oldest_first(state_url):
    made = [new_key() for _ in range(3)]

    async def body(store):
        for i, (key_id, key) in enumerate(made):
            await store.add(record_for(key, key_id, f"p{i}").model_copy(
                update={"created": 1000.0 + i}))
        return [r.principal for r in await store.list()]

    assert run(_with(state_url, body)) == ["p0", "p1", "p2"]


def test_two_clients_of_one_store_see_each_others_writes(state_url):
    key_id, key = new_key()

    async def body():
        a, b = open_keys(state_url), open_keys(state_url)
        try:
            await a.add(record_for(key, key_id, "alice"))
            seen = await b.find(key_hash(key))
            await b.revoke(key_id)
            return seen, await a.find(key_hash(key))
        finally:
            await a.close()
            await b.close()

    seen, after = run(body())
    assert seen.principal == "alice" and after.revoked is not None


def test_a_store_that_cannot_be_reached_is_state_unavailable(tmp_path, redis_server):
    (tmp_path / "a-file").write_text("")
    for url in (f"sqlite://{tmp_path}/a-file/state.db",  # its directory cannot exist
                f"redis://127.0.0.1:{redis_server.port + 1}/0",
                f"redis+cluster://127.0.0.1:{redis_server.port + 1}/0"):
        with pytest.raises(StateUnavailable):
            run(_with(url, lambda store: store.find("0" * 64)))

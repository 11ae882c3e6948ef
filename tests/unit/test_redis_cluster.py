"""The Redis backend on a real three-node Redis Cluster (tests/conftest.py), beyond
the contract suites it also passes: principals' quotas spread over the nodes, the
key store on the one node of its slot, a node down fails only its own principals
closed, and the URL forms. Each node is asked directly what it holds."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection

from serve.errors import ConfigError, StateUnavailable
from serve.quotas.keys import open_keys, state_backend
from serve.quotas.ledger import Budget, open_ledger
from serve.quotas.principals import key_hash, new_key, record_for
from serve.quotas.redis_backend import PREFIX, TIMEOUT_S, _quota_key, connect

B = Budget(burst=10.0, refill_per_s=0.0)


def run(open_store, url, fn):
    async def body():
        store = open_store(url)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(body())


def one_per_node(cluster) -> list[str]:
    """A principal whose quota lives on node 0, one on node 1, one on node 2."""
    found: dict[int, str] = {}
    for i in range(1000):
        found.setdefault(cluster.owner(_quota_key(f"p{i}")), f"p{i}")
        if len(found) == 3:
            return [found[n] for n in range(3)]
    raise AssertionError(f"no principal for every node: {found}")


def test_principals_spread_over_the_nodes_each_quota_whole_on_one(redis_cluster):
    redis_cluster.flush()
    principals = one_per_node(redis_cluster)

    async def body(ledger):  # one seed node in the URL: the client finds the others
        out = []
        for p in principals:
            r = (await ledger.reserve(p, 6, B)).reservation
            await ledger.commit(r, 4)
            out.append((await ledger.reserve(p, 7, B), await ledger.usage(p, B)))
        return out

    got = run(open_ledger, redis_cluster.url, body)
    for refused, usage in got:  # 10 - 4 kept: 6 left, so 7 is refused
        assert refused.reservation is None and refused.reason == "bucket"
        assert (usage.tokens, usage.today, usage.month, usage.held) == (
            pytest.approx(6), pytest.approx(4), pytest.approx(4), 0)
    for i, p in enumerate(principals):
        with redis_cluster.node(i) as node:
            assert node.keys("*") == [_quota_key(p)]


def test_the_key_store_lives_on_the_node_of_its_slot(redis_cluster):
    redis_cluster.flush()
    made = [new_key() for _ in range(3)]

    async def body(store):
        for i, (key_id, key) in enumerate(made):
            await store.add(record_for(key, key_id, f"p{i}").model_copy(
                update={"created": 1000.0 + i}))
        await store.revoke(made[1][0])
        return await store.list(), [await store.find(key_hash(k)) for _, k in made]

    listed, found = run(open_keys, redis_cluster.url, body)
    assert [r.principal for r in listed] == ["p0", "p1", "p2"] == [r.principal for r in found]
    assert [r.revoked is not None for r in listed] == [False, True, False]
    home = redis_cluster.owner(PREFIX)
    for i in range(3):
        with redis_cluster.node(i) as node:
            held = node.keys("*")
        assert len(held) == (4 if i == home else 0)  # three records and the id index
        assert all(k.startswith(PREFIX + ":") for k in held)


def test_a_node_down_fails_only_its_principals_and_its_restart_is_retried(redis_cluster):
    redis_cluster.flush()
    on_seed, _, on_down = one_per_node(redis_cluster)

    async def reserve(url_or_ledger, principal):
        if isinstance(url_or_ledger, str):
            ledger = open_ledger(url_or_ledger)
            try:
                return await ledger.reserve(principal, 1, B)
            finally:
                await ledger.close()
        return await url_or_ledger.reserve(principal, 1, B)

    async def body():
        ledger = open_ledger(redis_cluster.url)
        try:
            assert (await reserve(ledger, on_down)).reservation  # a pooled connection to it
            redis_cluster.stop(2)
            with pytest.raises(StateUnavailable):
                await reserve(redis_cluster.url, on_down)
            assert (await reserve(redis_cluster.url, on_seed)).reservation
            redis_cluster.start(2)  # no data kept, its slots kept: it rejoins
            redis_cluster.wait_ok()
            # The pooled connection is dead: the first call is resent on a fresh one.
            return await reserve(ledger, on_down)
        finally:
            await ledger.close()

    try:
        assert asyncio.run(body()).reservation is not None
    finally:
        if redis_cluster.procs[2] is None:
            redis_cluster.start(2)
        redis_cluster.wait_ok()


def test_a_cluster_url_on_a_server_not_in_cluster_mode_is_state_unavailable(redis_server):
    with pytest.raises(StateUnavailable):
        run(open_keys, f"redis+cluster://127.0.0.1:{redis_server.port}/0",
            lambda store: store.find("0" * 64))


@pytest.mark.parametrize(("url", "ssl"), [
    ("redis+cluster://10.0.0.7:6379/0", False), ("redis+cluster://redis-cluster:6379", False),
    ("rediss+cluster://:secret@redis-cluster:6380/", True),
])
def test_a_cluster_url_names_one_seed_node(url, ssl):
    assert state_backend(url) == "redis"
    client = connect(url)  # lazy: nothing is reached yet
    assert isinstance(client, RedisCluster)
    assert client.connection_kwargs["connection_class"] is (SSLConnection if ssl else Connection)
    assert client.connection_kwargs["socket_timeout"] == TIMEOUT_S
    assert client.connection_kwargs["decode_responses"] is True
    assert client.retry.get_retries() == 1
    assert not isinstance(connect(url.replace("+cluster", "")), RedisCluster)


@pytest.mark.parametrize(("url", "says"), [
    ("redis+cluster://:secret@redis-cluster:6379/2", "'/2'"),
    ("redis+cluster:///0", "names one node"),
    ("redis-cluster://redis:6379", "redis\\+cluster://HOST:PORT"),
])
def test_a_bad_cluster_url_refuses_to_start_without_quoting_a_password(url, says):
    with pytest.raises(ConfigError, match=says) as e:
        state_backend(url)
    assert "secret" not in str(e.value)

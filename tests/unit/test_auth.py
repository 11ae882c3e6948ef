"""Stage 1, authenticate: bearer parsing, the keys file beside the state store,
revocation within the cache TTL, failing closed. (Backends: test_state_contract.py.)"""

from __future__ import annotations

import asyncio

import pytest
import yaml

from serve.errors import ConfigError, StateUnavailable, Unauthenticated
from serve.quotas.auth import CACHE_SIZE, Authenticator
from serve.quotas.keys import FileKeys, open_keys
from serve.quotas.principals import bearer, new_key, record_for


@pytest.mark.parametrize(("header", "says"), [
    (None, "missing API key"), ("", "missing API key"),
    ("Basic dXNlcjpwdw==", "malformed Authorization"), ("Bearer", "malformed"),
    ("Bearer ", "malformed"), ("Bearer not-a-key", "invalid API key"),
    ("Bearer ig_short_x", "invalid API key"), ("Bearer \udcff", "invalid API key"),
])
def test_a_missing_or_malformed_header_is_unauthenticated_never_echoed(header, says):
    with pytest.raises(Unauthenticated) as e:
        bearer(header)
    secret = (header or "").partition(" ")[2].strip()
    assert says in e.value.message and (not secret or secret not in e.value.message)


def test_bearer_takes_any_case_and_surrounding_space():
    _, key = new_key()
    assert bearer(f"bearer  {key} ") == key == bearer(f"Bearer {key}")


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def keyed(tmp_path):
    """(authenticator, store, clock, key, key id) over a SQLite state store."""
    store = open_keys(f"sqlite://{tmp_path / 'state.db'}")
    key_id, key = new_key()
    asyncio.run(store.add(record_for(key, key_id, "alice", ("user", "admin"), "team-a")))
    clock = Clock()
    return Authenticator(store, clock=clock), store, clock, key, key_id


def test_a_good_key_is_its_principal_and_a_revoked_one_stops_within_the_ttl(keyed):
    auth, store, clock, key, key_id = keyed
    p = asyncio.run(auth.authenticate(f"Bearer {key}"))
    assert (p.name, p.plan, p.key_id, p.has("reviewer")) == ("alice", "team-a", key_id, True)
    asyncio.run(store.revoke(key_id))
    assert asyncio.run(auth.authenticate(f"Bearer {key}")).name == "alice"  # cached
    clock.t += 5.1
    with pytest.raises(Unauthenticated, match="invalid or revoked"):
        asyncio.run(auth.authenticate(f"Bearer {key}"))


def test_an_unknown_key_is_unauthenticated_and_the_cache_stays_bounded(keyed):
    auth, *_ = keyed

    async def spray():
        for _ in range(CACHE_SIZE + 50):
            with pytest.raises(Unauthenticated):
                await auth.authenticate(f"Bearer {new_key()[1]}")

    asyncio.run(spray())
    assert len(auth._cache) == CACHE_SIZE


def test_a_mounted_keys_file_authenticates_beside_the_store(tmp_path, keyed):
    _, store, *_ = keyed
    key_id, key = new_key()
    entry = record_for(key, key_id, "ci-bot", ("user",), "batch").model_dump(mode="json")
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [entry]}))
    auth = Authenticator(store, FileKeys(path))
    assert asyncio.run(auth.authenticate(f"Bearer {key}")).plan == "batch"


@pytest.mark.parametrize(("text", "says"), [
    ("keys: [{key_id: x}]", "keys.0"), ("keys: [unclosed", "not YAML"),
    ("keys: [{key_id: abcdefabcdef, sha256: nothex, principal: p}]", "sha256"),
])
def test_a_bad_keys_file_refuses_to_start_naming_the_problem(tmp_path, text, says):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        FileKeys(path)


def test_a_store_that_is_down_fails_closed(redis_server):
    auth = Authenticator(open_keys(f"redis://127.0.0.1:{redis_server.port + 1}/0"))
    with pytest.raises(StateUnavailable) as e:
        asyncio.run(auth.authenticate(f"Bearer {new_key()[1]}"))
    assert e.value.retry_after_s == 5


def test_a_trusted_upstream_names_the_principal_only_from_its_addresses(keys):
    from serve.quotas.auth import Upstream

    store_auth, key = keys
    up = Upstream(("10.0.0.0/8", "::1"), "x-user", "drafts-only")
    auth = Authenticator(store_auth.store, upstream=up)
    named = {"x-user": "gw-alice", "authorization": f"Bearer {key}"}
    who = asyncio.run(auth.identify(named, "10.1.2.3"))
    assert (who.name, who.plan, who.roles, who.key_id) == (
        "gw-alice", "drafts-only", frozenset({"user"}), None)
    assert asyncio.run(auth.identify({"x-user": "gw-bob"}, "::1")).name == "gw-bob"
    assert asyncio.run(auth.identify({"x-user": "gw-eve"}, "::ffff:10.0.0.5")).name == "gw-eve"
    assert asyncio.run(auth.plan_of("gw-carol")) == "drafts-only"  # named by the gateway
    # From anyone else the header is ignored: the key decides, and without one, 401.
    assert asyncio.run(auth.identify(named, "192.168.1.1")).name == "tester"
    for peer in ("192.168.1.1", None, "testclient"):
        with pytest.raises(Unauthenticated):
            asyncio.run(auth.identify({"x-user": "gw-alice"}, peer))
    with pytest.raises(Unauthenticated, match="not a principal name"):
        asyncio.run(auth.identify({"x-user": "two words"}, "10.0.0.1"))


def test_without_an_upstream_the_identity_header_means_nothing(keys):
    auth, _ = keys
    with pytest.raises(Unauthenticated):
        asyncio.run(auth.identify({"x-imagegen-principal": "root"}, "127.0.0.1"))


def test_an_upstream_with_a_bad_address_or_an_unknown_plan_refuses_to_start():
    from serve.app import build_app
    from serve.config import load_settings

    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(trusted_proxies=["10.0.0.300"])
    with pytest.raises(ConfigError, match="identity_plan 'nosuch'"):
        build_app(load_settings(trusted_proxies=["10.0.0.0/8"], identity_plan="nosuch"))


def test_a_repeated_identity_header_is_refused_on_both_transports(keys):
    from starlette.datastructures import Headers

    from serve.ingress.grpc import _metadata, _peer
    from serve.quotas.auth import Upstream

    auth = Authenticator(keys[0].store, upstream=Upstream(("127.0.0.1",), "x-user"))
    twice = Headers(raw=[(b"x-user", b"gw-alice"), (b"x-user", b"root")])
    with pytest.raises(Unauthenticated, match="more than once"):
        asyncio.run(auth.identify(twice, "127.0.0.1"))

    class Context:
        def __init__(self, peer, md=()):
            self._peer, self._md = peer, md

        def peer(self):
            return self._peer

        def invocation_metadata(self):
            return self._md

    joined = _metadata(Context("ipv4:127.0.0.1:5", (("x-user", "gw-alice"), ("x-user", "root"))))
    with pytest.raises(Unauthenticated, match="not a principal name"):
        asyncio.run(auth.identify(joined, "127.0.0.1"))
    assert [_peer(Context(p)) for p in ("ipv4:10.1.2.3:5060", "ipv6:%5B::1%5D:60906",
                                        "ipv6:[fe80::1]:1", "unix:/tmp/s")] == [
        "10.1.2.3", "::1", "fe80::1", None]


def test_a_binary_identity_header_is_refused():
    from serve.config import load_settings

    with pytest.raises(ConfigError, match="binary gRPC metadata"):
        load_settings(identity_header="X-User-Bin")

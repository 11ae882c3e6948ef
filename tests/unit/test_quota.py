"""Stage 7 through the service and the HTTP transport: reserve before any GPU work,
commit on success with its price, refund on failure and cancellation, 429 with
Retry-After and the RateLimit fields (draft-ietf-httpapi-ratelimit-headers-10)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from serve.errors import GenerationFailed, QuotaExceeded
from serve.ingress.http import build_http_app
from serve.quotas.ledger import Budget, open_ledger
from serve.quotas.plans import Plans
from serve.quotas.principals import Principal
from serve.routing import LiveRouting
from serve.schemas import GenerateRequest
from serve.service import ImageService

UNIT = 64 * 48 / 1e6  # one tiny-draft image at the test lock's default size, weight 1
PLANS = Plans.model_validate({"plans": {
    "tight": {"tiers": ["draft"], "bucket": {"burst": 3 * UNIT, "refill_per_s": UNIT / 10},
              "pricing": [{"up_to": 2 * UNIT, "price": 10.0}, {"price": 1.0}]},
    "capped": {"tiers": ["draft"], "bucket": {"burst": 100, "refill_per_s": 1},
               "daily_units": 1.5 * UNIT}}})
WHO = Principal(name="alice", roles=frozenset({"user"}), plan="tight")


@pytest.fixture
def ledger(tmp_path):
    return open_ledger(f"sqlite://{tmp_path / 'state.db'}")


def svc(lock, routing, backend, ledger, auth=None):
    return ImageService(lock, LiveRouting(routing, lock, "file t"), backend, auth=auth,
                        plans=PLANS, ledger=ledger)


def gen(s, who=WHO, **fields):
    return asyncio.run(s.generate(GenerateRequest(prompt="a fox", **fields), "r", who))


def tokens(ledger, plan="tight"):
    return asyncio.run(ledger.usage("alice", Budget.of(PLANS.plans[plan]))).tokens


def test_each_request_is_charged_and_priced_then_refused_when_the_budget_is_spent(
        lock, routing, backend, ledger):
    s = svc(lock, routing, backend, ledger)
    first, second = gen(s), gen(s, n=2)
    assert first.price == pytest.approx(10 * UNIT)  # the first band
    assert second.price == pytest.approx(10 * UNIT + 1 * UNIT)  # crosses into the second
    with pytest.raises(QuotaExceeded) as e:
        gen(s)
    assert e.value.retry_after_s >= 10 and e.value.ratelimit["policy"] == "bucket"
    assert len(backend.calls) == 2  # the refused request never reached a model


class Failing:
    async def generate(self, model, jobs):
        raise GenerationFailed("boom")


class Hanging:
    async def generate(self, model, jobs):
        await asyncio.sleep(30)


def test_a_failed_request_is_refunded(lock, routing, ledger):
    s = svc(lock, routing, Failing(), ledger)
    with pytest.raises(GenerationFailed):
        gen(s)
    assert tokens(ledger) == pytest.approx(3 * UNIT)


def test_a_cancelled_request_is_refunded(lock, routing, ledger):
    s = svc(lock, routing, Hanging(), ledger)

    async def main():
        task = asyncio.create_task(s.generate(GenerateRequest(prompt="x"), "r", WHO))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)  # the shielded refund finishes

    asyncio.run(main())
    assert tokens(ledger) == pytest.approx(3 * UNIT, abs=UNIT / 10)


def test_the_daily_cap_refuses_with_its_own_policy(lock, routing, backend, ledger):
    s = svc(lock, routing, backend, ledger)
    who = Principal(name="alice", roles=frozenset({"user"}), plan="capped")
    gen(s, who)
    with pytest.raises(QuotaExceeded) as e:
        gen(s, who)
    assert e.value.ratelimit["policy"] == "daily" and e.value.details[0]["type"] == "daily"


def test_http_answers_429_with_retry_after_and_the_ratelimit_fields(lock, routing, backend,
                                                                     ledger, keys):
    auth, key = keys  # the key's principal is `tester`, on plan default: give it `tight`
    plans = Plans.model_validate({"plans": {"default": PLANS.plans["tight"].model_dump()}})
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, auth=auth,
                     plans=plans, ledger=ledger)

    async def ready():
        return True, {}

    app = build_http_app(s, ready, max_body_bytes=4096, metrics=_metrics())
    c = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    assert [c.post("/v1/images", json={"prompt": "x"}).status_code for _ in range(3)] == [
        200, 200, 200]
    r = c.post("/v1/images", json={"prompt": "x"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert int(r.headers["retry-after"]) >= 10
    assert r.headers["ratelimit-policy"] == \
        f'"bucket";q={int(3 * UNIT * 1000)};w=30;imagegen-unit="milli-cost-units"'
    assert r.headers["ratelimit"].startswith('"bucket";r=0;t=')
    o = c.post("/v1/images/generations", json={"prompt": "x"})
    assert o.status_code == 429 and o.json()["error"]["type"] == "rate_limit_error"


def _metrics():
    from serve.telemetry import Metrics

    return Metrics("prometheus")


def test_charged_and_refused_units_are_counted_by_plan(lock, routing, backend, ledger, keys):
    from serve.telemetry import request_scope

    metrics = _metrics()
    s = svc(lock, routing, backend, ledger)

    async def one():
        with request_scope("t", request_id="r", route="/v1/images", carrier=None,
                           metrics=metrics):
            await s.generate(GenerateRequest(prompt="x"), "r", WHO)

    for _ in range(3):
        asyncio.run(one())
    with pytest.raises(QuotaExceeded):
        asyncio.run(one())

    def units(**labels):
        return metrics.registry.get_sample_value("imagegen_quota_units_total", labels)

    assert units(plan="tight", outcome="charged", reason="ok") == pytest.approx(3 * UNIT)
    assert units(plan="tight", outcome="rejected", reason="bucket") == pytest.approx(UNIT)


class Gate:
    """A model call that waits until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def generate(self, model, jobs):
        await self.release.wait()
        return await _ok(jobs)


async def _ok(jobs):
    import numpy as np

    from serve.engines.base import Generated

    return Generated([np.zeros((j.height, j.width, 3), np.uint8) for j in jobs], 0.0, 0.001,
                     len(jobs))


def test_one_principal_gets_a_bounded_share_and_others_still_get_in(lock, routing, ledger):
    from serve.errors import RateLimited

    gate = Gate()
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), gate,
                     in_flight_per_principal=2)
    bob = Principal(name="bob", roles=frozenset({"user"}), plan="tight")

    async def main():
        held = [asyncio.create_task(s.generate(GenerateRequest(prompt="x"), "r", WHO))
                for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(RateLimited) as e:
            await s.generate(GenerateRequest(prompt="x"), "r", WHO)
        other = asyncio.create_task(s.generate(GenerateRequest(prompt="x"), "r", bob))
        await asyncio.sleep(0.05)
        gate.release.set()
        await asyncio.gather(*held, other)
        again = await s.generate(GenerateRequest(prompt="x"), "r", WHO)  # a slot came back
        return e.value, other.result(), again, dict(s.fairness.counts)

    refused, other, again, counts = asyncio.run(main())
    assert refused.code == "rate_limited" and refused.retry_after_s == 1
    assert other.images and again.images and counts == {}


@pytest.mark.parametrize(("plan", "n", "says"), [
    ("tight", 4, "burst"), ("capped", 2, "daily cap"),
])
def test_a_request_dearer_than_the_whole_budget_is_a_plan_limit_not_a_wait(
        lock, routing, backend, ledger, plan, n, says):
    from serve.errors import PlanLimit

    s = svc(lock, routing, backend, ledger)
    who = Principal(name="alice", roles=frozenset({"user"}), plan=plan)
    with pytest.raises(PlanLimit, match=says):
        gen(s, who, n=n)
    assert backend.calls == []


def test_a_revision_at_capacity_refuses_the_next_request_before_its_budget(lock, routing,
                                                                            ledger):
    from serve.errors import Overloaded

    gate = Gate()
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), gate, plans=PLANS,
                     ledger=ledger, capacity={"tiny-draft": 2})

    async def main():
        held = [asyncio.create_task(s.generate(GenerateRequest(prompt="x"), "r", WHO))
                for _ in range(2)]
        await asyncio.sleep(0.05)
        spent = await ledger.usage("alice", Budget.of(PLANS.plans["tight"]))
        with pytest.raises(Overloaded) as e:
            await s.generate(GenerateRequest(prompt="x"), "r", WHO)
        after = await ledger.usage("alice", Budget.of(PLANS.plans["tight"]))
        final = asyncio.create_task(s.generate(GenerateRequest(prompt="x", tier="final"), "r"))
        await asyncio.sleep(0.05)
        gate.release.set()
        await asyncio.gather(*held, final)
        return e.value, spent, after, final.result(), dict(s.capacity.counts)

    refused, spent, after, final, counts = asyncio.run(main())
    assert refused.code == "overloaded" and refused.retry_after_s == 1
    assert after.held == spent.held == 2  # the refused request reserved nothing
    assert final.model == "tiny-final"  # another revision still has room
    assert counts == {}


def replaying(lock, routing, backend, ledger, tmp_path):
    from serve.quotas.idempotency import open_replays

    return ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                        ledger=ledger, replays=open_replays(f"sqlite://{tmp_path / 'state.db'}"))


def test_a_retry_under_its_idempotency_key_gets_the_first_answer_charged_once(
        lock, routing, backend, ledger, tmp_path):
    s = replaying(lock, routing, backend, ledger, tmp_path)
    ask = GenerateRequest(prompt="a fox")  # no seed: the retry must not draw another

    async def main():
        first = await s.generate(ask, "r1", WHO, "key-1")
        again = await s.generate(ask, "r2", WHO, "key-1")
        fresh = await s.generate(ask, "r3", WHO, "key-2")
        return first, again, fresh

    first, again, fresh = asyncio.run(main())
    assert not first.replayed and again.replayed
    assert again.model_dump(exclude={"replayed"}) == first.model_dump(exclude={"replayed"})
    assert fresh.id == "r3" and not fresh.replayed
    assert len(backend.calls) == 2  # the replay never reached a model
    assert tokens(ledger) == pytest.approx(UNIT, abs=UNIT / 10)  # two charged, not three


def test_an_idempotency_key_reused_with_another_body_or_while_running_is_refused(
        lock, routing, ledger, tmp_path):
    from serve.errors import IdempotencyInProgress, IdempotencyKeyReused

    gate = Gate()
    s = replaying(lock, routing, gate, ledger, tmp_path)

    async def main():
        first = asyncio.create_task(s.generate(GenerateRequest(prompt="x"), "r1", WHO, "k"))
        await asyncio.sleep(0.05)
        with pytest.raises(IdempotencyInProgress) as running:  # even resending its id
            await s.generate(GenerateRequest(prompt="x"), "r1", WHO, "k")
        gate.release.set()
        await first
        with pytest.raises(IdempotencyKeyReused) as reused:
            await s.generate(GenerateRequest(prompt="y"), "r3", WHO, "k")
        return running.value, reused.value

    running, reused = asyncio.run(main())
    assert running.retry_after_s == 1 and reused.details[0]["field"] == "Idempotency-Key"


def test_a_failed_request_frees_its_idempotency_key_for_the_retry(lock, routing, backend,
                                                                  ledger, tmp_path):
    s = replaying(lock, routing, Failing(), ledger, tmp_path)
    with pytest.raises(GenerationFailed):
        asyncio.run(s.generate(GenerateRequest(prompt="x"), "r1", WHO, "k"))
    s.backend = backend
    retried = asyncio.run(s.generate(GenerateRequest(prompt="x"), "r2", WHO, "k"))
    assert retried.id == "r2" and not retried.replayed and len(backend.calls) == 1
    assert tokens(ledger) == pytest.approx(2 * UNIT, abs=UNIT / 10)  # the failure: refunded


def test_http_takes_the_idempotency_key_header_and_refuses_a_bad_one(
        lock, routing, backend, ledger, keys, tmp_path):
    from serve.quotas.idempotency import open_replays

    auth, key = keys
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, auth=auth,
                     replays=open_replays(f"sqlite://{tmp_path / 'state.db'}"))

    async def ready():
        return True, {}

    c = TestClient(build_http_app(s, ready, max_body_bytes=4096, metrics=_metrics()),
                   headers={"Authorization": f"Bearer {key}"})
    once = [c.post(route, json={"prompt": "x"}, headers={"Idempotency-Key": f"k-{route}"})
            for route in ("/v1/images", "/v1/images", "/v1/images/generations",
                          "/v1/images/generations")]
    assert [r.status_code for r in once] == [200] * 4
    assert [once[1].json()["replayed"], once[3].json()["imagegen"]["replayed"]] == [True, True]
    assert once[1].json()["images"] == once[0].json()["images"]
    assert len(backend.calls) == 2
    bad = c.post("/v1/images", json={"prompt": "x"}, headers={"Idempotency-Key": "a b"})
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == \
        "Idempotency-Key"


def test_a_caller_reads_its_own_budget_and_only_an_admin_reads_anothers(
        lock, routing, backend, ledger, tmp_path):
    from serve.errors import Forbidden, NotFound
    from serve.quotas.auth import Authenticator
    from serve.quotas.keys import open_keys
    from serve.quotas.principals import new_key, record_for

    store = open_keys(f"sqlite://{tmp_path / 'keys.db'}")
    key_id, key = new_key()
    asyncio.run(store.add(record_for(key, key_id, "alice", ("user",), "tight")))
    s = svc(lock, routing, backend, ledger, auth=Authenticator(store))
    gen(s)
    mine = asyncio.run(s.quota(WHO))
    assert (mine.principal, mine.plan, mine.held) == ("alice", "tight", 0)
    assert mine.bucket_units == pytest.approx(2 * UNIT, abs=UNIT / 10)
    assert mine.month_units == pytest.approx(UNIT) and mine.burst == pytest.approx(3 * UNIT)
    bob = Principal(name="bob", roles=frozenset({"user", "reviewer"}), plan="tight")
    with pytest.raises(Forbidden) as e:
        asyncio.run(s.quota(bob, "alice"))
    assert e.value.code == "forbidden" and "admin" in e.value.message
    root = Principal(name="root", roles=frozenset({"admin"}), plan="tight")
    seen = asyncio.run(s.quota(root, "alice"))  # the bucket refilled a little since
    assert seen.model_dump(exclude={"bucket_units"}) == mine.model_dump(exclude={"bucket_units"})
    with pytest.raises(NotFound):
        asyncio.run(s.quota(root, "nobody"))


class SlowClaims:
    """Replays whose claim answers after a pause (a store round trip)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def claim(self, *args, **kwargs):
        await asyncio.sleep(0.1)
        return await self.inner.claim(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_caller_that_leaves_while_its_key_is_claimed_frees_it(lock, routing, backend,
                                                                ledger, tmp_path):
    from serve.quotas.idempotency import open_replays

    replays = open_replays(f"sqlite://{tmp_path / 'state.db'}")
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                     ledger=ledger, replays=SlowClaims(replays))

    async def main():
        task = asyncio.create_task(s.generate(GenerateRequest(prompt="x"), "r1", WHO, "k"))
        await asyncio.sleep(0.02)
        task.cancel()  # while the store answers the claim
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # the claim lands, then its release
        return await replays.claim("alice", "k", "other body", "someone")

    assert asyncio.run(main()).state == "new"  # free: not stuck for the lease
    assert backend.calls == []


def test_capacity_is_counted_on_the_revision_a_request_will_reach(entry_dicts, toml_lock):
    import copy

    from serve.lockfile import parse_lock
    from serve.routing import parse_routing

    gate = Gate()
    e = entry_dicts()
    e["spare"] = copy.deepcopy(e["tiny-draft"]) | {"source": {"kind": "path", "path": "s"}}
    lock = parse_lock(toml_lock(e))
    table = parse_routing({"tiers": {"draft": {"model": "tiny-draft",
                                               "fallbacks": ["spare"]}}}, lock)
    live = LiveRouting(table, lock, "file t")
    s = ImageService(lock, live, gate, capacity={"tiny-draft": 1, "spare": 1})
    live.set_ready("tiny-draft", False, "down")  # its fallback serves the tier

    async def main():
        held = asyncio.create_task(s.generate(GenerateRequest(prompt="x"), "r"))
        await asyncio.sleep(0.05)
        counts = dict(s.capacity.counts)
        gate.release.set()
        return counts, await held

    counts, served = asyncio.run(main())
    assert served.model == "spare" and counts == {"spare": 1}

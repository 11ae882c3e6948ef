"""Budgets through the real stack: 50 parallel requests against ten requests' worth
of budget admit exactly ten (SQLite here; tests/serve/test_quota_redis.py runs the
same against Redis), the rest 429 with Retry-After and the RateLimit fields."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.serve


def add_key(state_url: str, principal: str, plan: str, roles=("user",)) -> str:
    from serve.quotas.keys import open_keys
    from serve.quotas.principals import new_key, record_for

    key_id, key = new_key()

    async def add():
        store = open_keys(state_url)
        await store.add(record_for(key, key_id, principal, roles, plan))
        await store.close()

    asyncio.run(add())
    return key


def flood(url: str, key: str, n: int = 50) -> list[httpx.Response]:
    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/images", json={"prompt": "a fox", "seed": i},
                          headers={"Authorization": f"Bearer {key}"}, timeout=120)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_fifty_parallel_requests_against_ten_units_admit_exactly_ten(stack, stack_settings):
    key = add_key(stack_settings["state_url"], "flooder", "ten-drafts")
    answers = flood(stack, key)
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 10 + [429] * 40, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert int(refused.headers["retry-after"]) > 0
    assert refused.headers["ratelimit-policy"].startswith('"bucket";q=41;')  # 40.96 milli-units
    ok = [r.json() for r in answers if r.status_code == 200]
    assert all(b["price"] is not None and b["cost_units"] == 0.004096 for b in ok)


def test_a_retry_under_an_idempotency_key_is_answered_once_on_every_transport(
        stack, stack_settings):
    """The same key and body, sent twice over each transport with its real client:
    the second answer is the first (`replayed`), and the budget pays for one."""
    import grpc
    import openai
    from grpc_key import keyed_channel

    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc
    from serve.quotas.ledger import Budget, open_ledger
    from serve.quotas.plans import load_plans

    key = add_key(stack_settings["state_url"], "retrier", "default")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "http-1"}
    http = [httpx.post(f"{stack}/v1/images", json={"prompt": "a fox"}, headers=headers,
                       timeout=60).json() for _ in range(2)]
    client = openai.OpenAI(base_url=f"{stack}/v1", api_key=key, max_retries=0)
    oa = [client.images.generate(prompt="a fox", model="draft",
                                 extra_headers={"Idempotency-Key": "openai-1"}).model_extra
          for _ in range(2)]
    with keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", key) as ch:
        stub = pb_grpc.ImagesStub(ch)
        rpc = [stub.Generate(pb.GenerateRequest(prompt="a fox"), timeout=60,
                             metadata=(("idempotency-key", "grpc-1"),)) for _ in range(2)]
        with pytest.raises(grpc.RpcError) as reused:  # same key, another body
            stub.Generate(pb.GenerateRequest(prompt="a hen"), timeout=60,
                          metadata=(("idempotency-key", "grpc-1"),))
    assert [a["replayed"] for a in http] == [False, True]
    assert http[1]["images"] == http[0]["images"] and http[1]["id"] == http[0]["id"]
    assert [a["imagegen"]["replayed"] for a in oa] == [False, True]
    assert oa[1]["imagegen"]["seeds"] == oa[0]["imagegen"]["seeds"]
    assert [r.replayed for r in rpc] == [False, True] and rpc[1].images == rpc[0].images
    assert reused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(reused.value.trailing_metadata())["imagegen-code"] == "idempotency_key_reused"

    plan = load_plans(Path(stack_settings["plans_file"])).get("default")

    async def month() -> float:
        ledger = open_ledger(stack_settings["state_url"])
        try:
            return (await ledger.usage("retrier", Budget.of(plan))).month
        finally:
            await ledger.close()

    assert asyncio.run(month()) == pytest.approx(3 * 0.004096)  # three charged, not six


def test_a_trusted_gateway_names_the_caller_on_every_transport(stack, stack_settings):
    """The stack trusts 127.0.0.1 to name principals (identity_plan drafts-only): a
    named caller needs no key, gets that plan's limits, and its own budget."""
    import grpc
    import openai

    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc

    # X-Forwarded-For is not believed: the peer stays the loopback gateway
    named = {"X-Imagegen-Principal": "gw-user@example.com", "X-Forwarded-For": "10.9.9.9"}
    draft = httpx.post(f"{stack}/v1/images", json={"prompt": "a fox"}, headers=named,
                       timeout=60)
    final = httpx.post(f"{stack}/v1/images", json={"prompt": "a fox", "tier": "final"},
                       headers=named, timeout=60)
    bad = httpx.post(f"{stack}/v1/images", json={"prompt": "a fox"},
                     headers={"X-Imagegen-Principal": "not a name"}, timeout=60)
    assert draft.status_code == 200 and draft.json()["price"] is not None
    assert final.status_code == 403 and final.json()["error"]["code"] == "plan_limit"
    assert bad.status_code == 401
    client = openai.OpenAI(base_url=f"{stack}/v1", api_key="unused", max_retries=0,
                           default_headers=named)
    assert client.images.generate(prompt="a fox", model="draft").data[0].b64_json
    with grpc.insecure_channel(f"127.0.0.1:{stack_settings['grpc_port']}") as ch:
        r = pb_grpc.ImagesStub(ch).Generate(
            pb.GenerateRequest(prompt="a fox"), timeout=60,
            metadata=(("x-imagegen-principal", "gw-user@example.com"),))
    assert r.images


def test_the_budget_is_read_over_http_and_grpc_and_anothers_needs_admin(stack, stack_settings):
    import grpc
    from grpc_key import keyed_channel

    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc

    key = add_key(stack_settings["state_url"], "reader", "default")
    admin_key = add_key(stack_settings["state_url"], "ops", "default", ("admin",))
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{stack}/v1/images", json={"prompt": "a fox"}, headers=headers,
                      timeout=60).status_code == 200
    mine = httpx.get(f"{stack}/v1/quota", headers=headers, timeout=10)
    assert mine.status_code == 200
    assert (mine.json()["principal"], mine.json()["plan"]) == ("reader", "default")
    assert mine.json()["month_units"] == pytest.approx(0.004096)
    other = httpx.get(f"{stack}/v1/quota/ops", headers=headers, timeout=10)
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    assert httpx.get(f"{stack}/v1/quota", timeout=10).status_code == 401
    with keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", admin_key) as ch:
        seen = pb_grpc.ImagesStub(ch).GetQuota(pb.GetQuotaRequest(principal="reader"),
                                               timeout=10)
    assert (seen.principal, seen.month_units) == ("reader", pytest.approx(0.004096))
    with (keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", key) as ch,
          pytest.raises(grpc.RpcError) as e):
        pb_grpc.ImagesStub(ch).GetQuota(pb.GetQuotaRequest(principal="ops"), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


"""Budgets through the real stack: 50 parallel requests against ten requests' worth
of budget admit exactly ten (SQLite here; tests/serve/test_quota_redis.py runs the
same against Redis), the rest 429 with Retry-After and the RateLimit fields."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.serve


def add_key(state_url: str, principal: str, plan: str) -> str:
    from serve.quotas.keys import open_keys
    from serve.quotas.principals import new_key, record_for

    key_id, key = new_key()

    async def add():
        store = open_keys(state_url)
        await store.add(record_for(key, key_id, principal, ("user",), plan))
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

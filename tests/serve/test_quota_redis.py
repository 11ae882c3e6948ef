"""Budgets through a real `imagegen serve` on the Redis state store: 50 parallel
requests against ten requests' worth admit exactly ten; Redis stopped mid-run is a
clear 503 state_unavailable (never an admission), and back again the accounting is
exact (nothing over-admitted)."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml
from service_proc import Service
from test_quota_stack import add_key, flood

pytestmark = pytest.mark.serve

PLANS = {"plans": {
    "default": {"tiers": ["draft", "final"]},
    "ten-drafts": {"tiers": ["draft"], "bucket": {"burst": 0.04096, "refill_per_s": 0.0001}},
    "five-drafts": {"tiers": ["draft"], "bucket": {"burst": 0.02048, "refill_per_s": 0.0001}},
}}
ROUTING = {"tiers": {"draft": {"model": "tiny-draft"}, "final": {"model": "tiny-final"}}}


@pytest.fixture(scope="module")
def svc(tmp_path_factory, served_models, new_ports, redis_server):
    tmp = tmp_path_factory.mktemp("quota-redis")
    plans = tmp / "plans.yaml"
    plans.write_text(yaml.safe_dump(PLANS))
    s = Service(tmp, served_models, new_ports(), ROUTING, settings={
        "state_url": redis_server.url, "plans_file": str(plans),
        "storage_secret": "a-secret-every-replica-shares"})
    s.wait_for("  metrics: ")
    yield s
    s.stop(keep=frozenset({redis_server.proc.pid}))  # restarted by a test: not the service's


def test_fifty_parallel_requests_against_ten_units_admit_exactly_ten(svc, redis_server):
    key = add_key(redis_server.url, "flooder", "ten-drafts")
    statuses = sorted(r.status_code for r in flood(svc.url, key))
    assert statuses == [200] * 10 + [429] * 40, statuses


def test_redis_down_is_a_clear_503_and_back_again_nothing_is_over_admitted(svc, redis_server):
    key = add_key(redis_server.url, "restarter", "five-drafts")
    headers = {"Authorization": f"Bearer {key}"}

    def post() -> httpx.Response:
        return httpx.post(f"{svc.url}/v1/images", json={"prompt": "a fox"}, headers=headers,
                          timeout=60)

    assert [post().status_code for _ in range(2)] == [200, 200]  # 3 left
    redis_server.stop()
    try:
        down = post()
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "state_unavailable"
        assert down.headers["retry-after"] == "5"
    finally:
        redis_server.start()
    time.sleep(0.5)
    statuses = sorted(r.status_code for r in flood(svc.url, key, 20))
    assert statuses == [200] * 3 + [429] * 17, statuses

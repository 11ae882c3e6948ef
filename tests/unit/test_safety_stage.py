"""Stage 4 through the service and the transports: a blocked prompt never reaches a
model and never costs quota (shown by the backend's calls, the ledger and the
counters), and each transport answers it in its own shape."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from serve.config import ROOT
from serve.errors import PromptBlocked
from serve.ingress.http import build_http_app
from serve.quotas.ledger import Budget, open_ledger
from serve.quotas.plans import Plans
from serve.quotas.principals import Principal
from serve.routing import LiveRouting
from serve.safety.policy import LivePolicy, load_policy_file
from serve.schemas import GenerateRequest
from serve.service import ImageService
from serve.telemetry import Metrics, request_scope

PLANS = Plans.model_validate({"plans": {
    "default": {"tiers": ["draft", "final"], "bucket": {"burst": 10, "refill_per_s": 0}},
    "adult": {"tiers": ["draft"], "safety_profile": "adult",
              "bucket": {"burst": 10, "refill_per_s": 0}}}})
ALICE = Principal(name="alice", roles=frozenset({"user"}), plan="default")


@pytest.fixture
def policy():
    return LivePolicy(load_policy_file(ROOT / "serve" / "safety" / "prompt_policy.yaml"))


def test_a_blocked_prompt_reaches_no_model_costs_nothing_and_is_counted(
        lock, routing, backend, tmp_path, policy):
    ledger = open_ledger(f"sqlite://{tmp_path / 'state.db'}")
    metrics = Metrics("prometheus")
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                     ledger=ledger, policy=policy)

    async def one(**fields):
        with request_scope("t", request_id="r", route="/v1/images", carrier=None,
                           metrics=metrics):
            return await s.generate(GenerateRequest(**fields), "r", ALICE)

    with pytest.raises(PromptBlocked):
        asyncio.run(one(prompt="a n.u.d.e figure"))
    with pytest.raises(PromptBlocked):
        asyncio.run(one(prompt="a g0re scene", tier="final"))
    assert backend.calls == []
    usage = asyncio.run(ledger.usage("alice", Budget.of(PLANS.plans["default"])))
    assert (usage.tokens, usage.held, usage.month) == (10, 0, 0)  # nothing reserved
    assert asyncio.run(one(prompt="a fox")).images  # the next innocent one is served

    def blocked(**labels):
        return metrics.registry.get_sample_value("imagegen_blocked_total", labels)

    assert blocked(tier="draft", stage="prompt_safety", reason="sexual_content") == 1
    assert blocked(tier="final", stage="prompt_safety", reason="graphic_violence") == 1
    for i in range(3):  # a blocked request is not routed: its tier is not a label yet
        with pytest.raises(PromptBlocked):
            asyncio.run(one(prompt="p0rn", tier=f"made-up-{i}"))
    assert blocked(tier="unknown", stage="prompt_safety", reason="sexual_content") == 3


def test_the_plans_safety_profile_decides(lock, routing, backend, policy):
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                     policy=policy)
    adult = Principal(name="bob", roles=frozenset({"user"}), plan="adult")
    assert asyncio.run(s.generate(GenerateRequest(prompt="a nude study"), "r", adult)).images
    with pytest.raises(PromptBlocked) as e:
        asyncio.run(s.generate(GenerateRequest(prompt="a nude child"), "r", adult))
    assert e.value.reason == "csam"  # no profile switches it off


def test_each_transport_answers_a_block_in_its_own_shape(lock, routing, backend, keys,
                                                        policy):
    auth, key = keys
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, auth=auth,
                     policy=policy)

    async def ready():
        return True, {}

    c = TestClient(build_http_app(s, ready, max_body_bytes=4096, metrics=Metrics("prometheus")),
                   headers={"Authorization": f"Bearer {key}"})
    native = c.post("/v1/images", json={"prompt": "sw@stika banner"})
    assert native.status_code == 403
    assert native.json()["error"]["code"] == "prompt_blocked"
    assert native.json()["error"]["details"] == [{"field": "prompt", "type": "hate"}]
    assert "stika" not in native.text
    oa = c.post("/v1/images/generations", json={"prompt": "sw@stika banner"})
    assert oa.status_code == 400  # OpenAI's own status for a moderation block
    assert (oa.json()["error"]["code"], oa.json()["error"]["param"]) == ("prompt_blocked",
                                                                          "prompt")
    assert backend.calls == []

"""Batch jobs through the service: a batch is checked at submission (a bad or blocked
item refuses it, naming its index), owned (anyone else: not found), cancellable,
and each item runs as its owner's request under an Idempotency-Key of its item id:
a retried item is charged once and gets the same seed."""

from __future__ import annotations

import asyncio

import pytest

from serve.batch.jobs import BatchCreate, BatchJobs, from_jsonl
from serve.batch.queue import open_queue
from serve.config import ROOT
from serve.errors import InvalidRequest, MalformedBody, NotFound, PromptBlocked
from serve.quotas.idempotency import open_replays
from serve.quotas.ledger import Budget, open_ledger
from serve.quotas.plans import Plans
from serve.quotas.principals import Principal
from serve.routing import LiveRouting
from serve.safety.policy import LivePolicy, load_policy_file
from serve.service import ImageService

PLANS = Plans.model_validate({"plans": {
    "default": {"tiers": ["draft", "final"], "bucket": {"burst": 100, "refill_per_s": 0}}}})
ALICE = Principal(name="alice", roles=frozenset({"user"}), plan="default")
BOB = Principal(name="bob", roles=frozenset({"user"}), plan="default")


class Plan:
    async def plan_of(self, principal):
        return "default"


@pytest.fixture
def world(lock, routing, backend, tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                     ledger=open_ledger(url), replays=open_replays(url),
                     policy=LivePolicy(load_policy_file(
                         ROOT / "serve" / "safety" / "prompt_policy.yaml")))
    s.auth = Plan()
    queue = open_queue(url)

    def allow(webhook):
        if not webhook.startswith("https://hooks.example.com/"):
            raise InvalidRequest("not on the webhook allowlist",
                                 details=[{"field": "webhook_url", "type": "not_allowed"}])

    s.test_ended = []

    async def ended(batch_id):
        s.test_ended.append(batch_id)
        return True

    s.batches = BatchJobs(queue, s.preflight, max_items=5, allow_webhook=allow, ended=ended)
    s.test_queue, s.test_ledger = queue, open_ledger(url)
    return s


def submit(s, who=ALICE, **body):
    return asyncio.run(s.submit_batch(who, BatchCreate(**{
        "requests": [{"prompt": "a fox"}, {"prompt": "a heron", "n": 2}], **body})))


def test_a_batch_is_checked_at_submission_naming_the_item(world):
    with pytest.raises(InvalidRequest) as e:
        submit(world, requests=[{"prompt": "a fox"}, {"prompt": "a fox", "steps": "4"}])
    assert e.value.details[0]["field"].startswith("requests.1")
    with pytest.raises(PromptBlocked) as b:
        submit(world, requests=[{"prompt": "a fox"}, {"prompt": "a p0rn scene"}])
    assert b.value.details[0]["field"] == "requests.1.prompt"
    assert b.value.message.startswith("requests[1]: ") and b.value.reason  # still its own
    with pytest.raises(InvalidRequest):
        submit(world, requests=[{"prompt": "a fox"}] * 6)  # over batch_max_items
    with pytest.raises(InvalidRequest) as w:
        submit(world, webhook_url="http://169.254.169.254/latest")
    assert w.value.details[0]["field"] == "webhook_url"
    assert asyncio.run(world.my_batches(ALICE)) == []  # nothing was queued


def test_a_batch_is_its_owners_and_a_resubmission_is_the_same_batch(world):
    b = submit(world, id="campaign_7", webhook_url="https://hooks.example.com/done")
    assert (b.id, b.state, b.counts["pending"]) == ("campaign_7", "running", 2)
    assert submit(world, id="campaign_7").id == "campaign_7"  # the same, not twice
    assert [x.id for x in asyncio.run(world.my_batches(ALICE))] == ["campaign_7"]
    with pytest.raises(NotFound):
        asyncio.run(world.batch(BOB, "campaign_7"))
    with pytest.raises(InvalidRequest):
        submit(world, BOB, id="campaign_7")  # taken
    items = asyncio.run(world.test_queue.items("campaign_7"))
    assert all(isinstance(i.request["seed"], int) for i in items)  # drawn at submission
    assert world.test_ended == []
    cancelled = asyncio.run(world.cancel_batch(ALICE, "campaign_7"))
    assert cancelled.state == "cancelled" and cancelled.counts["cancelled"] == 2
    assert world.test_ended == ["campaign_7"]  # nothing in flight: its end is recorded now
    asyncio.run(world.cancel_batch(ALICE, "campaign_7"))
    assert world.test_ended == ["campaign_7"]  # a cancel that changed nothing records nothing


def test_a_jsonl_body_is_one_request_a_line_naming_a_bad_line():
    got = from_jsonl(b'{"prompt": "a fox"}\n\n{"prompt": "a heron", "n": 2}\r\n',
                     {"id": "spring_1", "completion_window_s": "3600"}, 2)
    assert (got.id, got.completion_window_s) == ("spring_1", 3600)
    assert got.requests == [{"prompt": "a fox"}, {"prompt": "a heron", "n": 2}]
    for raw, where in ((b'{"prompt": "a fox"}\n{"prompt": \n', "line 2"),
                       (b'{"prompt": "a fox"}\n["a list"]\n', "line 2"),
                       (b'{"prompt": "a fox", "prompt": "twice"}', "line 1")):
        with pytest.raises(MalformedBody, match=where):
            from_jsonl(raw, {}, 5)
    with pytest.raises(InvalidRequest) as e:
        from_jsonl(b'{"prompt": "a fox"}', {"completion_window_s": "soon"}, 5)
    assert e.value.details[0]["field"] == "completion_window_s"
    with pytest.raises(InvalidRequest):
        from_jsonl(b"\n\n", {}, 5)  # no requests
    with pytest.raises(InvalidRequest) as e:
        from_jsonl(b'{"prompt": "a fox"}', {"completion_window": "3600"}, 5)  # a typo
    assert e.value.details[0] == {"field": "completion_window", "type": "extra_forbidden"}
    with pytest.raises(InvalidRequest) as e:  # stops reading past the limit
        from_jsonl(b'{"prompt": "a fox"}\n' * 3 + b"not even json", {}, 3)
    assert e.value.details[0]["type"] == "too_long"


def test_an_item_runs_as_its_owners_request_and_a_retry_is_charged_once(world, backend):
    b = submit(world)
    queue = world.test_queue
    [item] = asyncio.run(queue.claim("w", 30, 1))
    first = asyncio.run(world.run_item(item, "alice"))
    spent = 100 - asyncio.run(world.test_ledger.usage(
        "alice", Budget.of(PLANS.plans["default"]))).tokens
    again = asyncio.run(world.run_item(item, "alice"))  # the worker died before completing
    assert again == first and len(backend.calls) == 1
    assert 100 - asyncio.run(world.test_ledger.usage(
        "alice", Budget.of(PLANS.plans["default"]))).tokens == pytest.approx(spent)
    assert first["seeds"] == [item.request["seed"]] and first["cost_units"] > 0
    assert asyncio.run(queue.complete(item.id, item.lease_owner, first))
    results = asyncio.run(world.batch_results(ALICE, b.id))
    assert [(r.index, r.state) for r in results] == [(0, "succeeded"), (1, "pending")]

"""The routing document's fallbacks and switches, the live routing an ingress
applies, and the service failing over: which revision serves, what is retried
and what is not. No Ray: a backend whose revisions fail on demand."""

from __future__ import annotations

import asyncio
import copy

import pytest

from serve.engines.base import Generated, Job
from serve.errors import (
    ConfigError,
    Forbidden,
    GenerationFailed,
    InvalidRequest,
    LimitExceeded,
    ModelTimeout,
    ModelUnavailable,
    Overloaded,
    TierDisabled,
)
from serve.lockfile import parse_lock
from serve.routing import LiveRouting, parse_routing
from serve.routing.breaker import State
from serve.schemas import GenerateRequest
from serve.service import ImageService
from serve.telemetry import Metrics

DOC = {
    "version": 3,
    "tiers": {
        "draft": {"model": "tiny-draft", "fallbacks": ["spare", "spare2"], "cost_weight": 2.0},
        "final": {"model": "tiny-final", "cost_weight": 4.0},
        "cheap": {"model": "spare", "cost_weight": 0.5},
    },
    "breaker": {"consecutive_failures": 2, "min_requests": 100, "open_s": 60},
}


@pytest.fixture
def lock(entry_dicts, toml_lock):
    e = entry_dicts()
    e["spare"] = copy.deepcopy(e["tiny-draft"]) | {"source": {"kind": "path", "path": "s"}}
    e["spare2"] = copy.deepcopy(e["tiny-draft"]) | {"source": {"kind": "path", "path": "s2"}}
    return parse_lock(toml_lock(e))


def doc(**tier_fields) -> dict:
    d = copy.deepcopy(DOC)
    d["tiers"]["draft"].update(tier_fields)
    return d


# --- the document ------------------------------------------------------------


@pytest.mark.parametrize(("fields", "needles"), [
    ({"fallbacks": ["nope"]}, ["models not in models.lock: nope"]),
    ({"fallbacks": ["tiny-final"]}, ["tiny-final accepts less than tiny-draft",
                                     "max_guidance 10.0 < 20.0", "min_size 64 > 32",
                                     "commercial_use 'restricted', stricter"]),
    ({"canary": {"model": "tiny-final", "weight": 0.1}}, ["tiny-final accepts less"]),
    ({"fallbacks": ["spare", "spare"]}, ["appears twice"]),
    ({"fallbacks": ["tiny-draft"]}, ["appears twice"]),
    ({"canary": {"model": "spare", "weight": 1.0}}, ["canary.weight"]),
    ({"disabled": ""}, ["disabled"]),
    ({"force_fallback": "yes"}, ["force_fallback"]),
    ({"fallback": ["spare"]}, ["fallback", "Extra inputs"]),
])
def test_bad_documents_are_refused_naming_the_problem(lock, fields, needles):
    with pytest.raises(ConfigError) as e:
        parse_routing(doc(**fields), lock, origin="routing.yaml")
    for needle in needles:
        assert needle in e.value.message, e.value.message


def test_a_wider_fallback_of_equal_terms_is_accepted(lock):
    table = parse_routing(doc(), lock)
    assert table.backed_by("spare") == ["cheap", "draft"]
    assert table.tiers_of("spare") == ["cheap"]
    assert table.routed_models() == ["spare", "spare2", "tiny-draft", "tiny-final"]


@pytest.mark.parametrize(("fields", "draw", "order"), [
    ({}, 0.5, ["tiny-draft", "spare", "spare2"]),
    ({"force_fallback": True}, 0.5, ["spare", "spare2", "tiny-draft"]),
    ({"fallbacks": ["spare"], "canary": {"model": "spare2", "weight": 0.2}}, 0.1,
     ["spare2", "tiny-draft", "spare"]),
    ({"fallbacks": ["spare"], "canary": {"model": "spare2", "weight": 0.2}}, 0.2,
     ["tiny-draft", "spare2", "spare"]),
])
def test_candidates(lock, fields, draw, order):
    assert parse_routing(doc(**fields), lock).tiers["draft"].candidates(draw) == order


def test_a_fallback_never_costs_more_than_the_tier_nor_its_own_tier(lock):
    table = parse_routing(doc(), lock)
    assert table.cost_weight("draft", "tiny-draft") == 2.0
    assert table.cost_weight("draft", "spare") == 0.5  # the primary of `cheap`
    assert table.cost_weight("draft", "spare2") == 2.0  # nobody's primary: the tier's


def test_disabled_tier_is_refused_with_its_message(lock):
    table = parse_routing(doc(disabled="maintenance until 14:00 UTC"), lock)
    with pytest.raises(TierDisabled, match="maintenance until 14:00 UTC"):
        table.route("draft")
    assert TierDisabled.retry_after_s


# --- live routing --------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def live(lock, clock):
    return LiveRouting(parse_routing(DOC, lock), lock, "file routing.yaml",
                       metrics=Metrics("prometheus"), clock=clock, draw=lambda: 0.5)


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d)


def _sample(live, name, **labels):
    return live.metrics.registry.get_sample_value(name, labels)


def test_an_invalid_document_keeps_the_last_good_one_and_is_counted(live):
    assert not live.apply_text("tiers: {draft: {model: nope}}", "file routing.yaml")
    assert not live.apply_text("tiers: [unclosed", "file routing.yaml")
    assert live.table.version == 3 and live.table.tiers["draft"].fallbacks == ["spare", "spare2"]
    assert "not YAML" in live.error
    assert _sample(live, "imagegen_routing_config_errors_total", source="file") == 2
    snap = live.snapshot()
    assert snap["version"] == 3 and "not YAML" in snap["error"]


def test_a_switch_flips_the_order_and_the_gauge(live):
    assert live.candidates("draft")[0] == "tiny-draft"
    assert _sample(live, "imagegen_fallback_active", tier="draft") == 0
    assert live.apply_text(_yaml(doc(force_fallback=True) | {"version": 4}), "file routing.yaml")
    assert live.candidates("draft")[0] == "spare"
    assert _sample(live, "imagegen_fallback_active", tier="draft") == 1
    assert live.snapshot()["tiers"]["draft"]["on_fallback"] and live.error is None


def test_an_unready_primary_puts_the_tier_on_its_fallback(live):
    live.set_ready("tiny-draft", False, "sha256 mismatch for unet/x")
    assert live.on_fallback("draft") and live.tier_ready("draft")
    assert not live.allow("tiny-draft")
    live.set_ready("spare", False, "x")
    live.set_ready("spare2", False, "x")
    assert not live.tier_ready("draft")
    snap = live.snapshot()
    assert snap["revisions"]["tiny-draft"]["reason"] == "sha256 mismatch for unet/x"


# --- the service failing over ---------------------------------------------------


class FlakyBackend:
    """Revisions fail with the error queued for them (one per call), else succeed."""

    def __init__(self) -> None:
        self.failures: dict[str, list[Exception]] = {}
        self.always: dict[str, Exception] = {}
        self.calls: list[str] = []

    async def generate(self, model: str, jobs: list[Job]) -> Generated:
        self.calls.append(model)
        if model in self.always:
            raise self.always[model]
        if self.failures.get(model):
            raise self.failures[model].pop(0)
        import numpy as np

        imgs = [np.zeros((j.height, j.width, 3), np.uint8) for j in jobs]
        return Generated(imgs, queue_s=0.0, generate_s=0.001, batch_images=len(jobs))


@pytest.fixture
def flaky():
    return FlakyBackend()


@pytest.fixture
def svc(lock, live, flaky):
    return ImageService(lock, live, flaky)


def gen(svc, **fields):
    return asyncio.run(svc.generate(GenerateRequest(prompt="a fox", **fields), "r"))


def test_a_dead_replica_is_retried_once_on_the_same_revision(svc, flaky):
    flaky.failures["tiny-draft"] = [ModelUnavailable("replica died")]
    r = gen(svc)
    assert flaky.calls == ["tiny-draft", "tiny-draft"]
    assert (r.model, r.fallback, r.cost_units) == ("tiny-draft", False, round(2 * 64 * 48 / 1e6, 6))


def test_steps_scale_the_cost_against_the_models_default(svc, flaky):
    one = round(2 * 64 * 48 / 1e6, 6)  # the draft tier's weight 2 x megapixels, default steps
    assert gen(svc).cost_units == one
    assert gen(svc, quality="high").cost_units == 2 * one  # twice the default steps
    assert gen(svc, steps=1, n=2).cost_units == round(2 * one * 1 / 4, 6)  # default is 4


def test_two_failures_move_the_request_to_the_fallback_priced_as_served(svc, flaky, live):
    flaky.failures["tiny-draft"] = [GenerationFailed("boom"), GenerationFailed("boom")]
    r = gen(svc)
    assert flaky.calls == ["tiny-draft", "tiny-draft", "spare"]
    assert (r.model, r.fallback) == ("spare", True)
    assert r.cost_units == round(0.5 * 64 * 48 / 1e6, 6)
    assert live.breakers["tiny-draft"].state is State.OPEN  # consecutive_failures 2
    flaky.calls.clear()
    gen(svc)
    assert flaky.calls == ["spare"]  # open: no request tries the primary


def test_the_breaker_probes_after_open_s_and_closes_on_recovery(svc, flaky, live, clock):
    flaky.always["tiny-draft"] = GenerationFailed("boom")
    gen(svc)
    assert live.breakers["tiny-draft"].state is State.OPEN
    assert _sample(live, "imagegen_fallback_active", tier="draft") == 1
    del flaky.always["tiny-draft"]
    clock.t = 61
    flaky.calls.clear()
    r1, r2 = gen(svc), gen(svc)  # two probes (half_open_probes 2)
    assert flaky.calls == ["tiny-draft", "tiny-draft"] and not r1.fallback and not r2.fallback
    assert live.breakers["tiny-draft"].state is State.CLOSED
    assert _sample(live, "imagegen_fallback_active", tier="draft") == 0
    assert _sample(live, "imagegen_breaker_state", model="tiny-draft",
                   revision=live.lock.models["tiny-draft"].revision) == 0


@pytest.mark.parametrize("exc", [Overloaded("full"), LimitExceeded("too big")])
def test_overload_and_bad_input_are_never_retried(svc, flaky, exc):
    flaky.always["tiny-draft"] = exc
    with pytest.raises(type(exc)):
        gen(svc)
    assert flaky.calls == ["tiny-draft"]


def test_every_revision_failing_answers_the_last_error(svc, flaky):
    for m in ("tiny-draft", "spare", "spare2"):
        flaky.always[m] = ModelUnavailable(f"{m} down")
    with pytest.raises(ModelUnavailable, match="spare2 down"):
        gen(svc)
    assert flaky.calls == ["tiny-draft", "tiny-draft", "spare", "spare", "spare2", "spare2"]


def test_with_nothing_usable_the_first_candidate_still_answers(svc, flaky, live):
    for m in ("tiny-draft", "spare", "spare2"):
        live.set_ready(m, False, "x")
    flaky.always["tiny-draft"] = ModelUnavailable("tiny-draft is not ready: x")
    with pytest.raises(ModelUnavailable, match="not ready"):
        gen(svc)
    assert flaky.calls == ["tiny-draft"]


def test_limits_are_the_primarys_even_when_a_fallback_serves(svc, flaky, live):
    live.set_ready("tiny-draft", False, "x")
    r = gen(svc)  # defaults of tiny-draft: 64x48
    assert (r.model, r.images[0].width, r.images[0].height) == ("spare", 64, 48)
    with pytest.raises(LimitExceeded, match="tiny-draft"):
        gen(svc, size="512x512")


def test_probes_that_end_without_an_outcome_give_their_slot_back(svc, flaky, live, clock):
    flaky.always["tiny-draft"] = GenerationFailed("boom")
    gen(svc)
    assert live.breakers["tiny-draft"].state is State.OPEN
    clock.t = 61
    flaky.always["tiny-draft"] = Overloaded("full")
    for _ in range(3):  # more than half_open_probes requests end with no outcome
        with pytest.raises(Overloaded):
            gen(svc)
    del flaky.always["tiny-draft"]
    r1, r2 = gen(svc), gen(svc)
    assert (r1.model, r2.model) == ("tiny-draft", "tiny-draft")
    assert live.breakers["tiny-draft"].state is State.CLOSED


def test_a_timed_out_revision_is_not_tried_again_for_that_request(svc, flaky):
    flaky.failures["tiny-draft"] = [ModelTimeout("no answer within 120 s")]
    r = gen(svc)
    assert flaky.calls == ["tiny-draft", "spare"] and r.fallback


def test_a_canary_that_serves_is_not_a_fallback(lock, flaky):
    d = doc(fallbacks=["spare"], canary={"model": "spare2", "weight": 0.5})
    live = LiveRouting(parse_routing(d, lock), lock, "file t", draw=lambda: 0.1)
    r = asyncio.run(ImageService(lock, live, flaky).generate(GenerateRequest(prompt="x"), "r"))
    assert (r.model, r.fallback) == ("spare2", False)


def test_a_tiers_own_primary_pays_the_tiers_weight(lock):
    d = copy.deepcopy(DOC)
    d["tiers"]["pricey"] = {"model": "spare", "cost_weight": 3.0}
    table = parse_routing(d, lock)
    assert table.cost_weight("pricey", "spare") == 3.0  # not cheap's 0.5
    assert table.cost_weight("draft", "spare") == 0.5


# --- pinning a revision ------------------------------------------------------------


def test_pinning_is_refused_unless_allowed_and_names_the_field(svc):
    with pytest.raises(Forbidden) as e:
        gen(svc, model="spare")
    assert e.value.details[0]["field"] == "model" and "name a tier" in e.value.message


def test_a_pinned_revision_alone_serves_with_no_fallback_and_pays_at_least_its_tier(
        lock, live, flaky):
    svc = ImageService(lock, live, flaky, may_pin=True)
    r = gen(svc, model="tiny-final", tier="draft")
    assert (r.model, r.pinned, r.fallback) == ("tiny-final", True, False)
    assert r.cost_units == round(4.0 * 96 * 96 / 1e6, 6)  # final's weight and defaults
    flaky.calls.clear()
    flaky.always["spare"] = GenerationFailed("boom")
    with pytest.raises(GenerationFailed):  # draft would fall back to spare2; pinned: no
        gen(svc, model="spare")
    assert set(flaky.calls) == {"spare"}
    with pytest.raises(InvalidRequest) as e:
        gen(svc, model="nope")
    assert e.value.details[0]["field"] == "model" and "tiny-draft" in e.value.message


def test_a_pinned_request_honours_its_tier_being_disabled(lock, flaky):
    live = LiveRouting(parse_routing(doc(disabled="maintenance"), lock), lock, "file t")
    with pytest.raises(TierDisabled):
        gen(ImageService(lock, live, flaky, may_pin=True), model="spare")


def test_a_pinned_revision_pays_the_dearest_tier_it_serves_or_the_dearest_of_all(lock):
    d = doc(fallbacks=["spare"], canary={"model": "spare2", "weight": 0.1})
    table = parse_routing(d, lock)
    assert table.cost_weight("cheap", "tiny-final", pinned=True) == 4.0  # final's primary
    assert table.cost_weight("cheap", "spare2", pinned=True) == 2.0  # draft's canary
    assert table.cost_weight("cheap", "spare", pinned=False) == 0.5
    d["tiers"]["dear"] = {"model": "spare", "fallbacks": ["spare2"], "cost_weight": 8.0}
    assert parse_routing(d, lock).cost_weight("cheap", "spare2", pinned=True) == 8.0
    del d["tiers"]["dear"], d["tiers"]["draft"]["canary"]
    table = parse_routing(d, lock)
    assert table.backed_by("spare2") == []
    assert table.cost_weight("cheap", "spare2", pinned=True) == 4.0  # routed by none

"""Plans: the file's validation, the admission checks by table, commercial terms
through the service, progressive pricing."""

from __future__ import annotations

import asyncio
import copy

import pytest
import yaml

from serve.config import ROOT
from serve.errors import CommercialUseForbidden, ConfigError, PlanLimit
from serve.lockfile import parse_lock
from serve.quotas.plans import Plans, admit, load_plans, price, unrouted_tiers
from serve.quotas.principals import Principal
from serve.routing import LiveRouting, parse_routing
from serve.schemas import GenerateRequest
from serve.service import ImageService


def test_the_packaged_plans_load_and_match_the_packaged_routing():
    plans = load_plans(ROOT / "serve" / "plans.yaml")
    assert {"default", "drafts-only", "commercial"} <= set(plans.plans)
    assert unrouted_tiers(plans, {"draft", "final"}) == {}
    assert unrouted_tiers(plans, {"draft"}) == {"default": ["final"], "commercial": ["final"]}


@pytest.mark.parametrize(("doc", "says"), [
    ({"plans": {}}, "plans"),
    ({"plans": {"p": {"tiers": []}}}, "tiers"),
    ({"plans": {"p": {"tiers": ["draft"], "max_n": 0}}}, "max_n"),
    ({"plans": {"p": {"tiers": ["draft"], "colour": "red"}}}, "colour"),
    ({"plans": {"p": {"tiers": ["draft"], "pricing": [{"price": 1}, {"up_to": 5, "price": 1}]}}},
     "only the last band"),
    ({"plans": {"p": {"tiers": ["draft"], "pricing": [{"up_to": 9, "price": 1},
                                                      {"up_to": 5, "price": 1}, {"price": 1}]}}},
     "increase"),
    ({"plans": {"p": {"tiers": ["draft"], "bucket": {"burst": 0, "refill_per_s": 1}}}}, "burst"),
])
def test_a_bad_plans_file_refuses_to_start_naming_the_field(tmp_path, doc, says):
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=says):
        load_plans(path)


PLAN = Plans.model_validate({"plans": {"p": {
    "tiers": ["draft"], "max_n": 2, "max_megapixels": 0.5, "raw_prompts": False}}}).plans["p"]


@pytest.mark.parametrize(("kw", "field"), [
    ({"tier": "final"}, "tier"), ({"n": 3}, "n"), ({"megapixels": 0.6}, "size"),
    ({"raw_prompt": True}, "prompt"),
])
def test_each_plan_limit_is_refused_with_its_code_and_field(kw, field):
    args = {"tier": "draft", "n": 1, "megapixels": 0.1, "raw_prompt": False} | kw
    with pytest.raises(PlanLimit) as e:
        admit("p", PLAN, **args)
    assert e.value.code == "plan_limit" and e.value.details[0]["field"] == field


def test_within_every_limit_is_admitted():
    admit("p", PLAN, tier="draft", n=2, megapixels=0.5, raw_prompt=False)


def test_progressive_pricing_charges_each_unit_at_its_band():
    plan = Plans.model_validate({"plans": {"p": {"tiers": ["draft"], "pricing": [
        {"up_to": 100, "price": 0.01}, {"up_to": 1000, "price": 0.005}, {"price": 0.001}]}}}
    ).plans["p"]
    assert price(plan, 10, 0) == 0.1
    assert price(plan, 10, 95) == round(5 * 0.01 + 5 * 0.005, 6)  # crosses a band
    assert price(plan, 2000, 0) == round(100 * 0.01 + 900 * 0.005 + 1000 * 0.001, 6)


@pytest.fixture
def commercial(entry_dicts, toml_lock):
    """A lock whose draft primary is `restricted` and its fallback `allowed`; plans."""
    e = entry_dicts()
    e["tiny-draft"]["commercial_use"] = "restricted"
    e["spare"] = copy.deepcopy(e["tiny-draft"]) | {"source": {"kind": "path", "path": "s"},
                                                   "commercial_use": "restricted"}
    e["open"] = copy.deepcopy(e["tiny-draft"]) | {"source": {"kind": "path", "path": "o"},
                                                  "commercial_use": "allowed"}
    lock = parse_lock(toml_lock(e))
    routing = parse_routing({"tiers": {
        "draft": {"model": "tiny-draft", "fallbacks": ["open"]},
        "spare": {"model": "spare"}}}, lock)
    plans = Plans.model_validate({"plans": {
        "biz": {"tiers": ["draft", "spare"], "commercial": True},
        "lab": {"tiers": ["draft", "spare"]}}})
    return lock, routing, plans


def _gen(svc, plan, **fields):
    who = Principal(name="x", roles=frozenset({"user"}), plan=plan)
    return asyncio.run(svc.generate(GenerateRequest(prompt="a fox", **fields), "r", who))


def test_a_commercial_plan_is_served_only_by_revisions_licensed_for_it(commercial, backend_for):
    lock, routing, plans = commercial
    svc = ImageService(lock, LiveRouting(routing, lock, "file t"), backend_for(lock),
                       plans=plans)
    assert _gen(svc, "lab").model == "tiny-draft"  # a non-commercial plan: the primary
    r = _gen(svc, "biz")
    assert (r.model, r.fallback) == ("open", True)  # the restricted primary is skipped
    with pytest.raises(CommercialUseForbidden) as e:
        _gen(svc, "biz", tier="spare")
    assert e.value.code == "commercial_use_forbidden" and "restricted" in e.value.message


def test_the_plan_is_checked_on_the_request_and_an_unknown_plan_is_403(commercial, backend_for):
    lock, routing, plans = commercial
    plans = Plans.model_validate({"plans": {"tiny": {"tiers": ["draft"], "max_n": 1}}})
    svc = ImageService(lock, LiveRouting(routing, lock, "file t"), backend_for(lock),
                       plans=plans)
    with pytest.raises(PlanLimit, match="max_n 1"):
        _gen(svc, "tiny", n=2)
    with pytest.raises(PlanLimit, match="does not include tier 'spare'"):
        _gen(svc, "tiny", tier="spare")
    with pytest.raises(PlanLimit, match="plan 'gone' is not configured"):
        _gen(svc, "gone")

"""The load tests' pure parts (loadtests/): the SLO verdict on locust's own stats
objects, how an answer counts (429 and 503 expected, not failures), the request mix
and its bodies, and that every shape ends by itself."""

from __future__ import annotations

import importlib
import os
import random
import sys
import time

import pytest

from serve.config import ROOT


def _import_loadtests():
    # `import locust` monkey-patches the whole interpreter with gevent unless told not
    # to: this test process is shared with every other test.
    saved = os.environ.get("LOCUST_SKIP_MONKEY_PATCH")
    os.environ["LOCUST_SKIP_MONKEY_PATCH"] = "1"
    sys.path.insert(0, str(ROOT / "loadtests"))
    try:
        return tuple(importlib.import_module(m) for m in ("slo", "shapes", "mix"))
    finally:
        sys.path.remove(str(ROOT / "loadtests"))
        if saved is None:
            del os.environ["LOCUST_SKIP_MONKEY_PATCH"]


slo, shapes, mix = _import_loadtests()
from locust.stats import RequestStats  # after the patch switch above


def test_importing_locust_here_did_not_patch_the_interpreter():
    import socket

    assert socket.socket.__module__ == "socket"


def _stats(draft_ms=(), final_ms=(), failed=(), refused=()) -> RequestStats:
    """Requests logged the way locust's request event logs them."""
    stats = RequestStats()
    for tier, times in (("draft", draft_ms), ("final", final_ms)):
        for i, ms in enumerate(times):
            # two transports for one tier: the verdict merges them
            stats.log_request("HTTP" if i % 2 else "gRPC", slo.entry_name(tier), ms, 100)
    for tier, ms in failed:
        stats.log_request("HTTP", slo.entry_name(tier), ms, 0)
        stats.log_error("HTTP", slo.entry_name(tier), "HTTP 500 internal")
    for tier, status in refused:
        stats.log_request("HTTP", slo.entry_name(tier, status), 2, 50)
    return stats


def _check(report, what):
    return next(c for c in report.checks if c.what == what)


@pytest.mark.parametrize(("bound", "ok"), [(1000, True), (96, True), (95, False), (1, False)])
def test_p95_per_tier_against_its_bound(bound, ok):
    # 1..100 ms: locust's own percentile says 96 ms, and the verdict uses it
    stats = _stats(draft_ms=range(1, 101), final_ms=[5000] * 20)
    report = slo.evaluate(stats, slo.Slo({"draft": bound}))
    assert _check(report, "p95_ms[draft]").measured == 96
    assert report.ok is ok and _check(report, "p95_ms[draft]").ok is ok


def test_each_tier_is_judged_on_its_own_requests():
    stats = _stats(draft_ms=[10] * 50, final_ms=[800] * 50)
    report = slo.evaluate(stats, slo.Slo({"draft": 50, "final": 500}))
    assert (_check(report, "p95_ms[draft]").ok, _check(report, "p95_ms[final]").ok) == (
        True, False)
    assert not report.ok
    assert report.tiers["draft"].requests == 50 and report.tiers["final"].p95_ms == 800
    assert slo.evaluate(stats, slo.Slo({"draft": 50, "final": 900})).ok


def test_a_bound_on_a_tier_with_no_requests_fails():
    report = slo.evaluate(_stats(draft_ms=[10] * 10), slo.Slo({"final": 10_000}))
    assert _check(report, "p95_ms[final]").measured is None and not report.ok


@pytest.mark.parametrize(("failed", "limit", "ok"), [(0, 0.0, True), (1, 0.01, True),
                                                     (2, 0.01, False), (1, 0.0, False)])
def test_failure_ratio(failed, limit, ok):
    stats = _stats(draft_ms=[10] * (100 - failed), failed=[("draft", 10)] * failed)
    report = slo.evaluate(stats, slo.Slo(max_fail_ratio=limit))
    assert _check(report, "fail_ratio").measured == pytest.approx(failed / 100)
    assert report.ok is ok and report.failures == failed


def test_refusals_are_not_failures_nor_in_the_tier_latency():
    stats = _stats(draft_ms=[400] * 20, refused=[("draft", 429)] * 30 + [("final", 503)] * 5)
    report = slo.evaluate(stats, slo.Slo({"draft": 500}, max_fail_ratio=0.0))
    assert report.ok and report.failures == 0 and report.requests == 55
    assert report.tiers["draft"].p95_ms == 400  # not the 2 ms refusals
    assert report.tiers["draft"].refused == {429: 30} and report.tiers["final"].refused == {
        503: 5}
    assert {e["name"] for e in report.to_dict()["entries"]} == {"draft", "draft 429",
                                                                "final 503"}


def test_no_requests_and_user_exceptions_fail():
    assert not slo.evaluate(RequestStats(), slo.Slo()).ok
    report = slo.evaluate(_stats(draft_ms=[10]), slo.Slo(), exceptions=2)
    assert not report.ok and _check(report, "user_exceptions").measured == 2


@pytest.mark.parametrize(("status", "kind"), [(200, "ok"), (201, "ok"), (429, "refused"),
                                              (503, "refused"), (0, "failed"), (500, "failed"),
                                              (422, "failed"), (401, "failed"),
                                              (502, "failed")])
def test_outcome_of_a_status(status, kind):
    assert slo.outcome(status) == kind
    tier, refusal = slo.parse_name(slo.entry_name("final", status))
    assert tier == "final" and refusal == (status if kind == "refused" else None)


@pytest.mark.parametrize(("code", "service_code", "status"), [
    ("RESOURCE_EXHAUSTED", "quota_exceeded", 429),
    ("UNAVAILABLE", "overloaded", 503),
    ("DEADLINE_EXCEEDED", "model_timeout", 503),
    ("UNAVAILABLE", None, None),  # no server: a failure, not a refusal
    ("DEADLINE_EXCEEDED", None, None),  # the client's own deadline
    ("INVALID_ARGUMENT", "invalid_request", None),
])
def test_grpc_refusals_need_the_service_to_have_answered(code, service_code, status):
    assert slo.grpc_refusal(code, service_code) == status


def test_describe_names_each_check():
    lines = slo.describe(slo.evaluate(_stats(draft_ms=[50] * 10), slo.Slo({"draft": 1})))
    assert any("p95_ms[draft]: 50" in line and "MISSED" in line for line in lines)


def _run(shape, step_s=0.5, limit_s=3600):
    """(time, tick) until tick() returns None, with the shape's clock moved on."""
    seen, t = [], 0.0
    while t <= limit_s:
        shape.start_time = time.perf_counter() - t  # LoadTestShape.get_run_time's origin
        tick = shape.tick()
        if tick is None:
            return seen, t
        seen.append((t, tick))
        t += step_s
    pytest.fail(f"{type(shape).__name__} still running after {limit_s} s")


@pytest.mark.parametrize("profile", list(shapes.PROFILES))
def test_every_profile_stops_by_itself_at_its_duration(profile):
    shape = shapes.for_profile(profile)
    seen, end = _run(shape)
    assert seen and end == pytest.approx(shape.duration_s, abs=0.5)
    assert all(users >= 1 and rate > 0 for _, (users, rate) in seen)


def test_shapes_follow_their_stages():
    step = {u for _, (u, _) in _run(shapes.for_profile("step", users=8, duration_s=40))[0]}
    assert step == {2, 4, 6, 8}
    spike = [u for _, (u, _) in _run(shapes.for_profile("spike", users=2, duration_s=50))[0]]
    assert spike[0] == spike[-1] == 2 and max(spike) == 8
    assert _run(shapes.for_profile("smoke", users=3, duration_s=10))[0][-1][1] == (3, 3)


def test_shape_options_are_checked():
    with pytest.raises(ValueError, match="unknown profile 'burst'"):
        shapes.for_profile("burst")
    with pytest.raises(ValueError, match="duration"):
        shapes.SteadyShape(2, float("inf"))


def test_weights_parse_and_refuse_bad_terms():
    assert mix.parse_weights("draft=4, final=1") == {"draft": 4.0, "final": 1.0}
    for bad in ("draft", "draft=x", "draft=-1", "draft=0", ""):
        with pytest.raises(ValueError):
            mix.parse_weights(bad)


LISTING = {"templates": [
    {"id": "product-shot", "version": 1, "status": "approved", "tiers": ["draft", "final"],
     "free_text": "product",
     "variables": {"product": {"type": "string", "max_length": 80, "pattern": "[\\w ,.'&-]+"},
                   "background": {"type": "enum", "values": ["white", "black"]},
                   "angle": {"type": "number", "min": 0, "max": 90, "integer": True}}},
    {"id": "watercolor", "version": 1, "status": "deprecated", "tiers": ["draft"],
     "variables": {}},
    {"id": "sketch", "version": 3, "status": "approved", "tiers": ["final"],
     "variables": {"code": {"type": "string", "pattern": "[0-9]{6}"}}},  # nothing fits
]}


def test_the_mix_draws_tiers_by_weight_templates_and_fresh_seeds():
    templates = mix.servable_templates(LISTING)
    assert [t.ref for t in templates] == ["product-shot@1", "sketch@3"]
    m = mix.Mix({"draft": 3, "final": 1}, templates, template_share=0.5,
                rng=random.Random(7))
    recipes = [m.next() for _ in range(2000)]
    drafts = sum(r.tier == "draft" for r in recipes)
    assert 1350 < drafts < 1650
    assert len({r.seed for r in recipes}) > 1990  # a cache-busting seed each
    shots = [r for r in recipes if r.template == "product-shot@1"]
    assert 600 < len(shots) < 1100 and not any(r.template == "sketch@3" for r in recipes)
    for r in shots:
        assert r.variables["background"] in ("white", "black")
        assert 0 <= r.variables["angle"] <= 90 and isinstance(r.variables["angle"], int)


def test_cache_runs_repeat_a_small_fixed_set():
    one = mix.Mix({"draft": 1, "final": 1}, cache=True, rng=random.Random(1))
    two = mix.Mix({"draft": 1, "final": 1}, cache=True, rng=random.Random(2))
    def key(r):
        return r.tier, r.seed, r.prompt, r.template

    seen = {key(one.next()) for _ in range(500)}
    assert len(seen) == mix.CACHE_SET_SIZE and seen == {key(r) for r in two.cache_set}


def test_each_transport_gets_its_own_body():
    shot = mix.Recipe("final", 42, 2, template="product-shot@1", free_text="product",
                      variables={"product": "a brass desk lamp", "angle": 30})
    raw = mix.Recipe("draft", 7, prompt="a red fox in snow")
    assert mix.http_body(shot) == {"tier": "final", "seed": 42, "n": 2,
                                   "template": "product-shot@1",
                                   "variables": {"product": "a brass desk lamp", "angle": 30}}
    assert mix.openai_body(shot) == {"model": "final", "n": 2, "seed": 42,
                                     "prompt": "a brass desk lamp",
                                     "template": "product-shot@1", "variables": {"angle": 30}}
    assert mix.grpc_fields(shot)["variables"] == {"product": "a brass desk lamp", "angle": "30"}
    assert mix.http_body(raw) == {"tier": "draft", "seed": 7, "n": 1,
                                  "prompt": "a red fox in snow"}
    assert mix.openai_body(raw)["prompt"] == "a red fox in snow"

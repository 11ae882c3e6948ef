"""Routing: tier -> model, validated against the lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.errors import ConfigError, UnknownTier
from serve.lockfile import load_lock, parse_lock
from serve.routing import load_routing, parse_routing

SHIPPED = Path(__file__).resolve().parents[2] / "serve" / "routing.yaml"

TABLE = {
    "tiers": {
        "draft": {"model": "tiny-draft"},
        "final": {"model": "tiny-final"},
        "preview_2": {"model": "tiny-draft"},
        "hq-v1": {"model": "tiny-final"},
    }
}


@pytest.fixture
def table(lock):
    return parse_routing(TABLE, lock)


@pytest.mark.parametrize(
    ("tier", "model"),
    [("draft", "tiny-draft"), ("final", "tiny-final"), ("preview_2", "tiny-draft"),
     ("hq-v1", "tiny-final")],
)
def test_resolve(table, tier, model):
    assert table.resolve(tier) == model


@pytest.mark.parametrize("tier", ["Draft", "draft ", "", "drafts", "tiny-draft", "hq_v1"])
def test_unknown_tier_lists_known_tiers(table, tier):
    with pytest.raises(UnknownTier) as info:
        table.resolve(tier)
    assert info.value.code == "unknown_tier"
    assert repr(tier) in info.value.message
    assert info.value.message.endswith("known tiers: draft, final, hq-v1, preview_2")


@pytest.mark.parametrize(
    ("model", "tiers"),
    [("tiny-draft", ["draft", "preview_2"]), ("tiny-final", ["final", "hq-v1"]),
     ("unrouted", [])],
)
def test_tiers_of(table, model, tiers):
    assert table.tiers_of(model) == tiers


def test_routed_models_are_unique_and_sorted(table):
    assert table.routed_models() == ["tiny-draft", "tiny-final"]


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        pytest.param({"tiers": {"draft": {"model": "ghost"}}}, ["ghost", "not in models.lock"],
                     id="model-not-in-lock"),
        pytest.param({"tiers": {"a": {"model": "ghost"}, "b": {"model": "phantom"}}},
                     ["ghost", "phantom"], id="two-missing"),
        pytest.param({"tiers": {"Draft": {"model": "tiny-draft"}}}, ["tiers.Draft", "'Draft'"],
                     id="upper-tier"),
        pytest.param({"tiers": {"1st": {"model": "tiny-draft"}}}, ["tiers.1st"],
                     id="digit-first"),
        pytest.param({"tiers": {"a" * 33: {"model": "tiny-draft"}}}, ["a" * 33],
                     id="tier-too-long"),
        pytest.param({"tiers": {"has space": {"model": "tiny-draft"}}}, ["has space"],
                     id="tier-space"),
        pytest.param({"tiers": {}}, ["tiers"], id="empty-table"),
        pytest.param({}, ["tiers"], id="no-tiers"),
        pytest.param(None, ["routing.yaml"], id="empty-document"),
        pytest.param({"tiers": {"draft": {"model": "tiny-draft", "weight": 1}}},
                     ["tiers.draft.weight"], id="unknown-route-field"),
        pytest.param({"tiers": {"draft": {}}}, ["tiers.draft.model"], id="route-without-model"),
        pytest.param({"tiers": {"draft": {"model": "tiny-draft"}}, "fallback": "x"},
                     ["fallback"], id="unknown-top-field"),
    ],
)
def test_parse_routing_rejects(lock, data, needles):
    with pytest.raises(ConfigError) as info:
        parse_routing(data, lock, origin="routing.yaml")
    msg = str(info.value)
    assert msg.startswith("routing.yaml: ")
    for needle in needles:
        assert needle in msg


def test_tier_names_at_the_pattern_edges_are_accepted(lock):
    table = parse_routing({"tiers": {"a": {"model": "tiny-draft"},
                                     "z" * 32: {"model": "tiny-final"}}}, lock)
    assert table.resolve("z" * 32) == "tiny-final"


def test_shipped_routing_validates_against_the_shipped_lock():
    lock = load_lock(SHIPPED.parent.parent / "models.lock")
    table = load_routing(SHIPPED, lock)
    assert set(table.routed_models()) <= set(lock.models)
    assert table.resolve("draft") == "tiny-draft"
    assert table.resolve("final") == "tiny-final"
    assert table.tiers["final"].fallbacks == ["tiny-spare"]


def test_shipped_routing_rejects_a_lock_without_its_models(toml_lock, entry_dicts):
    only_draft = parse_lock(toml_lock({"tiny-draft": entry_dicts()["tiny-draft"]}))
    with pytest.raises(ConfigError, match="tiny-final"):
        load_routing(SHIPPED, only_draft)


@pytest.mark.parametrize(
    "text", [pytest.param("tiers: [unclosed", id="bad-yaml"), pytest.param(None, id="missing")]
)
def test_load_routing_errors_are_config_errors(tmp_path, lock, text):
    path = tmp_path / "routing.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match="routing"):
        load_routing(path, lock)


@pytest.mark.parametrize(("text", "needle"), [
    ("tiers: {draft: {model: tiny-draft, force_fallback: yes}}", "valid boolean (got 'yes')"),
    ("tiers: {draft: {model: tiny-draft, force_fallback: on}}", "valid boolean (got 'on')"),
    ("tiers:\n  draft: {model: tiny-draft, disabled: maintenance}\n  draft: {model: tiny-draft}\n",
     "duplicate key 'draft'"),
    ("version: 2\nversion: 3\ntiers: {draft: {model: tiny-draft}}\n", "duplicate key 'version'"),
])
def test_routing_yaml_is_as_strict_as_its_schema(lock, text, needle):
    from serve.routing import parse_routing_text

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        parse_routing_text(text, lock)


def test_true_and_false_are_still_booleans(lock):
    from serve.routing import parse_routing_text

    table = parse_routing_text("tiers: {draft: {model: tiny-draft, force_fallback: true}}", lock)
    assert table.tiers["draft"].force_fallback is True

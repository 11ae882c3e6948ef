"""The style library: loading and its refusals (an approved version changed, shared
negative prompts, bad declarations), resolving versions (drafts, deprecation,
retirement), and structural rendering that no value can break out of."""

from __future__ import annotations

import datetime as dt
import shutil

import pytest

from serve.config import ROOT
from serve.errors import (
    ConfigError,
    InvalidRequest,
    InvalidVariable,
    TemplateNotApproved,
    TemplateRetired,
    UnknownTemplate,
)
from serve.schemas import GenerateRequest, validate
from serve.templates.library import load_library, parse_template
from serve.templates.render import Styles

STYLES = ROOT / "serve" / "templates" / "styles"


@pytest.fixture
def styles():
    return Styles(load_library(STYLES), today=lambda: dt.date(2026, 12, 1))


def req(**fields) -> GenerateRequest:
    return validate(GenerateRequest, fields)  # as the transports parse it


def test_the_shipped_library_loads_and_pins_its_approvals():
    lib = load_library(STYLES)
    assert {t.ref for t in lib.all()} == {"product-shot@1", "product-shot@2", "watercolor@1",
                                          "watercolor@2"}
    for t in lib.all():
        assert t.status == "draft" or t.approved.sha256 == t.content_sha256()


def test_changing_an_approved_version_is_refused_at_load(tmp_path):
    shutil.copytree(STYLES, tmp_path / "s")
    f = tmp_path / "s" / "product-shot.v1.yaml"
    f.write_text(f.read_text().replace("85mm lens", "35mm lens"))
    with pytest.raises(ConfigError, match="immutable: make a new version"):
        load_library(tmp_path / "s")


@pytest.mark.parametrize(("change", "says"), [
    (lambda t: t.replace("{angle} degree view", "{angle} degree view, {lens}"),
     "undeclared variables"),
    (lambda t: t.replace("kind: photographic", "kind: painting"), "kind"),
    (lambda t: t + "extra: 1\n", "extra"),
    (lambda t: t.replace("status: draft", "status: approved"), "needs an approval"),
    (lambda t: t.replace("status: draft", "status: deprecated"), "needs an approval"),
    (lambda t: t.replace("default: white", "default: purple"), "not a value"),
    (lambda t: t.replace("free_text: product", "free_text: background"), "not a string"),
    (lambda t: t.replace("{angle} degree view", "{angle} degree {View}"), "stray brace"),
    (lambda t: t.replace("{angle} degree view", "{angle}} degree view"), "stray brace"),
    (lambda t: t.replace('alt_text: "Photo of {product}', 'alt_text: "Photo of {a b}'),
     "stray brace"),
])
def test_a_bad_template_names_the_problem(change, says):
    text = (STYLES / "product-shot.v2.yaml").read_text()
    with pytest.raises(ConfigError, match=says):
        parse_template(change(text), "t.yaml")


def test_photographic_and_illustration_never_share_a_negative_prompt(tmp_path):
    shutil.copytree(STYLES, tmp_path / "s")
    f = tmp_path / "s" / "product-shot.v2.yaml"
    water = (STYLES / "watercolor.v2.yaml").read_text()
    negative = next(line for line in water.splitlines() if line.startswith("negative_prompt"))
    text = f.read_text()
    old = next(line for line in text.splitlines() if line.startswith("negative_prompt"))
    f.write_text(text.replace(old, negative))
    with pytest.raises(ConfigError, match="share the negative prompt"):
        load_library(tmp_path / "s")


def test_versions_resolve_to_what_may_serve(styles):
    assert styles.resolve("product-shot").ref == "product-shot@1"  # @2 is a draft
    assert styles.resolve("product-shot", drafts=True).ref == "product-shot@2"
    with pytest.raises(TemplateNotApproved):
        styles.resolve("product-shot@2")
    assert styles.resolve("watercolor").ref == "watercolor@2"
    assert styles.resolve("watercolor@1").status == "deprecated"  # still serves until its date
    with pytest.raises(UnknownTemplate):
        styles.resolve("nope")
    with pytest.raises(UnknownTemplate, match="has no version 9"):
        styles.resolve("watercolor@9")
    later = Styles(styles.library, today=lambda: dt.date(2027, 6, 30))
    with pytest.raises(TemplateRetired) as e:
        later.resolve("watercolor@1")
    assert e.value.successor == "watercolor@2" and e.value.code == "template_retired"


def test_rendering_fills_slots_appends_the_locked_tokens_and_drafts_alt_text(styles):
    r = styles.render(req(template="product-shot", variables={
        "product": "a ceramic mug", "background": "black", "angle": 45}))
    # the locked tokens lead: a long value can never push them past the encoder's limit
    assert r.prompt == ("soft studio lighting, 85mm lens, sharp focus, studio product photo of "
                        "a ceramic mug, on a black background, 45 degree view")
    assert r.negative_prompt.startswith("blurry") and r.template.ref == "product-shot@1"
    assert r.alt_text == "Photo of a ceramic mug on a black background"
    assert r.values == {"product": "a ceramic mug"}  # what the prompt policy checks
    defaults = styles.render(req(template="product-shot", variables={"product": "a lamp"}))
    assert "white background, 30 degree view" in defaults.prompt


def test_the_prompt_fills_the_free_text_variable(styles):
    r = styles.render(req(template="watercolor", prompt="a fox in a forest"))
    assert r.prompt.endswith("watercolor illustration of a fox in a forest in spring, calm mood")
    with pytest.raises(InvalidVariable, match="given twice"):
        styles.render(req(template="watercolor", prompt="x", variables={"scene": "y"}))


@pytest.mark.parametrize(("variables", "kind"), [
    ({"product": "{0}"}, "syntax"),  # a format string
    ({"product": "{product.__class__}"}, "syntax"),
    ({"product": "{{background}}"}, "syntax"),  # template syntax
    ({"product": "${background}"}, "syntax"),
    ({"product": "<lora:nsfw:1.0>"}, "syntax"),  # token smuggling
    ({"product": "(masterpiece:1.6)"}, "syntax"),  # prompt weighting
    ({"product": "[mug|nude]"}, "syntax"),  # alternation
    ({"product": "mug\\n, nude"}, "syntax"),
    ({"product": "mug\u0007"}, "invalid_request"),  # control character (schema)
    ({"product": "mug, soft studio lighting"}, "locked_token"),  # adds a locked token
    ({"product": "mug, 85MM LENS"}, "locked_token"),
    ({"product": "mug, \u0455oft studio lighting"}, "locked_token"),  # a Cyrillic s
    ({"product": "x" * 81}, "too_long"),
    ({"product": "mug; DROP TABLE"}, "pattern"),
    ({"product": "mug", "lens": "35mm"}, "unknown_variable"),
    ({}, "missing"),
    ({"product": "   "}, "invalid_variable"),
    ({"product": "mug", "background": "purple"}, "invalid_variable"),
    ({"product": "mug", "angle": 91}, "invalid_variable"),
    ({"product": "mug", "angle": 12.5}, "invalid_variable"),  # integer only
    ({"product": "mug", "angle": "nan"}, "invalid_variable"),
    ({"product": "mug", "background": 3}, "invalid_variable"),
    ({"product": 7}, "invalid_variable"),
    ({"product": "mug", "angle": 10**400}, "invalid_variable"),  # past a float: no 500
])
def test_injection_attempts_are_refused_with_codes(styles, variables, kind):
    with pytest.raises((InvalidVariable, InvalidRequest)) as e:
        styles.render(req(template="product-shot", variables=variables))
    got = e.value.details[0]["type"] if isinstance(e.value, InvalidVariable) else e.value.code
    assert got == kind or e.value.code == kind, e.value.details


def test_a_template_keeps_its_own_negative_prompt_and_tiers(styles, tmp_path):
    with pytest.raises(InvalidRequest, match="sets the negative prompt"):
        styles.render(req(template="watercolor", prompt="a fox", negative_prompt="cats"))
    with pytest.raises(InvalidRequest, match="allows tiers"):
        styles.render(req(template="watercolor", prompt="a fox", tier="batch"))


def test_a_bad_reload_keeps_the_last_good_library(styles, tmp_path):
    shutil.copytree(STYLES, tmp_path / "s")
    (tmp_path / "s" / "broken.yaml").write_text("id: [\n")
    assert not styles.reload(tmp_path / "s") and "broken.yaml" in styles.error
    assert len(styles.library) == 4
    (tmp_path / "s" / "broken.yaml").unlink()
    (tmp_path / "s" / "watercolor.v1.yaml").unlink()
    assert styles.reload(tmp_path / "s") and len(styles.library) == 3 and styles.error is None


def test_through_the_service_and_http(lock, routing, backend, keys):
    from fastapi.testclient import TestClient

    from serve.config import ROOT as root
    from serve.ingress.http import build_http_app
    from serve.quotas.plans import Plans
    from serve.routing import LiveRouting
    from serve.safety.policy import LivePolicy, load_policy_file
    from serve.service import ImageService
    from serve.telemetry import Metrics

    auth, key = keys  # principal `tester`, plan default: templates only here
    plans = Plans.model_validate({"plans": {"default": {"tiers": ["draft", "final"],
                                                        "raw_prompts": False}}})
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, auth=auth,
                     plans=plans, styles=Styles(load_library(STYLES)),
                     policy=LivePolicy(load_policy_file(root / "serve" / "safety" /
                                                        "prompt_policy.yaml")))

    async def ready():
        return True, {}

    c = TestClient(build_http_app(s, ready, max_body_bytes=8192, metrics=Metrics("prometheus")),
                   headers={"Authorization": f"Bearer {key}"})
    ok = c.post("/v1/images", json={"template": "product-shot", "n": 2,
                                    "variables": {"product": "a red kettle"}})
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["template"] == "product-shot@1" and body["template_deprecation"] is None
    assert [i["alt_text"] for i in body["images"]] == [
        {"text": "Photo of a red kettle on a white background", "source": "template",
         "needs_review": True}] * 2
    assert "studio product photo of a red kettle" in backend.calls[-1][1][0].prompt
    raw = c.post("/v1/images", json={"prompt": "a red kettle"})
    assert raw.status_code == 403 and raw.json()["error"]["code"] == "plan_limit"
    old = c.post("/v1/images", json={"template": "watercolor@1", "prompt": "a fox"})
    assert old.status_code == 200
    assert old.json()["template_deprecation"] == {"successor": "watercolor@2",
                                                  "sunset": "2027-06-30"}
    assert old.headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
    assert old.headers["link"] == '</v1/templates/watercolor@2>; rel="successor-version"'
    banned = c.post("/v1/images", json={"template": "product-shot",
                                        "variables": {"product": "a nude figurine"}})
    assert banned.status_code == 403
    assert banned.json()["error"]["details"] == [{"field": "variables.product",
                                                  "type": "sexual_content"}]
    oa = c.post("/v1/images/generations", json={"prompt": "a fox", "template": "watercolor"})
    assert oa.status_code == 200 and oa.json()["imagegen"]["template"] == "watercolor@2"
    listed = c.get("/v1/templates").json()["templates"]
    assert {t["id"] for t in listed} == {"product-shot", "watercolor"}
    one = c.get("/v1/templates/watercolor@2").json()
    assert one["variables"]["season"]["values"][0] == "spring"
    assert c.get("/v1/templates/nope").status_code == 422
    assert c.get("/v1/templates").status_code == 200
    assert TestClient(c.app).get("/v1/templates").status_code == 401


def test_numbers_render_as_written(tmp_path):
    text = (STYLES / "product-shot.v2.yaml").read_text().replace(
        "angle: {type: number, min: 0, max: 90, integer: true, default: 30}",
        "angle: {type: number, min: -2000000, max: 2000000, default: 30}")
    (tmp_path / "t.yaml").write_text(text)
    styles = Styles(load_library(tmp_path), today=lambda: dt.date(2026, 12, 1))
    got = [styles.render(req(template="product-shot@2", variables={
        "product": "a mug", "angle": a}), drafts=True).prompt.rsplit(", ", 1)[-1]
        for a in (1000000, 0.123456789, -0.0, 12.5)]
    assert got == ["1000000 degree view", "0.123456789 degree view", "0 degree view",
                   "12.5 degree view"]


def test_a_successor_must_be_in_the_library(tmp_path):
    shutil.copytree(STYLES, tmp_path / "s")
    f = tmp_path / "s" / "watercolor.v1.yaml"
    f.write_text(f.read_text().replace("successor: watercolor@2", "successor: watercolor@7"))
    with pytest.raises(ConfigError, match="successor 'watercolor@7' is not in the library"):
        load_library(tmp_path / "s")


def test_approve_records_who_and_when_and_pins_the_content(tmp_path, capsys):
    from serve.cli.main import main

    shutil.copytree(STYLES, tmp_path / "s")
    f = tmp_path / "s" / "product-shot.v2.yaml"
    f.write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))  # a file from Windows
    assert main(["templates", "approve", "product-shot@2", "--by", "alice # bob",
                 "--dir", str(tmp_path / "s")]) == 0
    t = parse_template(f.read_bytes().decode(), "f")
    assert (t.status, t.approved.by) == ("approved", "alice # bob")
    assert b"\r\n" in f.read_bytes() and f.read_text().startswith("# v2, a draft")
    assert main(["templates", "approve", "product-shot@2", "--by", "x",
                 "--dir", str(tmp_path / "s")]) == 1  # already approved
    f.write_text(f.read_text().replace("high detail", "fine detail"))
    assert main(["templates", "validate", "--dir", str(tmp_path / "s")]) == 1
    assert "immutable" in capsys.readouterr().err

"""Stage 9, image safety: the thresholds' decisions (pure), the policy file's rules
(an always-on category is never loosened), and the stage through ImageService with
fixed-score classifiers: blurred and withheld images, their cases in the review
queue with the unblurred evidence, what is charged (a withheld image costs nothing),
fail closed, moderation levels, profiles; then the real classifier (NudeNet's ONNX
model) on real images the test draws."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from serve.config import ROOT
from serve.errors import ConfigError, Forbidden, ImageSafetyUnavailable
from serve.imaging import encode_png
from serve.quotas.ledger import Budget, open_ledger
from serve.quotas.plans import Plans
from serve.quotas.principals import Principal
from serve.routing import LiveRouting
from serve.safety.classifier import (
    FixedScores,
    LocalClassifier,
    NudeNet,
    check_spec,
    load_classifier,
)
from serve.safety.images import Thresholds, judge
from serve.safety.policy import LivePolicy, load_policy_file, parse_policy
from serve.safety.review import open_review
from serve.schemas import GenerateRequest
from serve.service import ImageService
from serve.telemetry import Metrics, request_scope

POLICY = ROOT / "serve" / "safety" / "prompt_policy.yaml"
PLANS = Plans.model_validate({"plans": {
    "default": {"tiers": ["draft", "final"], "bucket": {"burst": 100, "refill_per_s": 0}},
    "adult": {"tiers": ["draft"], "safety_profile": "adult",
              "bucket": {"burst": 100, "refill_per_s": 0}},
    "kids": {"tiers": ["draft"], "safety_profile": "age_gated",
             "bucket": {"burst": 100, "refill_per_s": 0}}}})
ALICE = Principal(name="alice", roles=frozenset({"user"}), plan="default")
RITA = Principal(name="rita", roles=frozenset({"reviewer"}), plan="default")
ADMIN = Principal(name="root", roles=frozenset({"admin"}), plan="default")
ALWAYS = frozenset({"sexual_minors"})


# The thresholds, pure.

RULES = {"sexual": Thresholds(review=0.3, blur=0.5, withhold=0.7),
         "suggestive": Thresholds(review=0.6)}


@pytest.mark.parametrize(("scores", "action", "category"), [
    ({"sexual": 0.29, "suggestive": 0.59}, "allow", None),
    ({"sexual": 0.3}, "review", "sexual"),  # thresholds are inclusive
    ({"sexual": 0.5}, "blur", "sexual"),
    ({"sexual": 0.7}, "withhold", "sexual"),
    ({"sexual": 0.4, "suggestive": 0.9}, "review", "suggestive"),  # tie: the surer score
    ({"sexual": 0.55, "suggestive": 0.99}, "blur", "sexual"),  # the severer action wins
    ({"violence": 1.0}, "allow", None),  # a category with no thresholds is allowed
])
def test_the_severest_action_reached_decides(scores, action, category):
    v = judge(scores, RULES, ALWAYS)
    assert (v.action, v.category, v.restricted) == (action, category, False)


def test_an_always_on_category_withholds_and_restricts_from_any_threshold():
    rules = {**RULES, "sexual_minors": Thresholds(review=0.2)}  # its mildest action
    v = judge({"sexual": 0.99, "sexual_minors": 0.25}, rules, ALWAYS)
    assert (v.action, v.category, v.restricted) == ("withhold", "sexual_minors", True)
    # with no thresholds given it is withheld from 0.5
    assert judge({"sexual_minors": 0.5}, RULES, ALWAYS).action == "withhold"
    assert judge({"sexual_minors": 0.49}, RULES, ALWAYS).action == "allow"


def policy_with(images: dict, profiles: dict | None = None) -> str:
    spec = yaml.safe_load(POLICY.read_text())
    spec["images"] = images
    if profiles is not None:
        spec["profiles"] = {"default": {"categories": "all"}, **profiles}
    return yaml.safe_dump(spec)


@pytest.mark.parametrize(("images", "profiles", "says"), [
    ({"thresholds": {"sexual": {"review": 0.8, "withhold": 0.5}}}, None, "review 0.8 is above"),
    ({"thresholds": {}, "low": {"sexual_minors": {"withhold": 0.9}}}, None,
     "images.low may not name always-on"),
    ({"thresholds": {"sexual_minors": {"withhold": 0.3}}},
     {"lax": {"images": {"sexual_minors": {"withhold": 0.6}}}}, "loosens"),
    ({"thresholds": {"sexual_minors": {"withhold": 0.3}}},
     {"lax": {"images": {"sexual_minors": {"review": 0.1}}}}, "loosens"),  # drops withhold
    ({"thresholds": {}}, {"lax": {"images": {"sexual_minors": {}}}}, "loosens"),
    ({"thresholds": {"sexual": {"blur": 1.5}}}, None, "less than or equal to 1"),
])
def test_the_policy_file_refuses_rules_that_loosen_or_contradict(images, profiles, says):
    with pytest.raises(ConfigError) as e:
        parse_policy(policy_with(images, profiles), "file p")
    assert says in e.value.message


def test_a_profile_may_only_tighten_the_always_on_category():
    p = parse_policy(policy_with(
        {"thresholds": {"sexual_minors": {"withhold": 0.3}}},
        {"strict": {"images": {"sexual_minors": {"review": 0.05, "withhold": 0.1}}}}), "f")
    assert p.image_rules("strict")["sexual_minors"].withhold == 0.1


def test_profiles_and_moderation_levels_choose_the_rules():
    p = load_policy_file(POLICY)
    assert p.image_rules("default")["sexual"].withhold == 0.7
    assert p.image_rules("default", "low")["sexual"].withhold == 0.85  # the OpenAI `low`
    assert p.image_rules("default", "auto") == p.image_rules("default")
    assert p.image_rules("age_gated", "low") == p.image_rules("age_gated")  # not allowed there
    assert p.image_rules("adult")["sexual"].action(0.85) == "allow"
    assert p.image_rules("adult")["sexual"].action(0.9) == "review"
    assert p.image_rules("adult", "low")["sexual_minors"].withhold == 0.3  # never loosened
    assert p.reason_of("sexual") == "sexual_content" and p.reason_of("suggestive") == \
        "image_suggestive"


def test_the_classifier_setting_parses():
    assert load_classifier("none") is None
    assert load_classifier("fixed:sexual=0.5,suggestive=0").classify([np.zeros((8, 8, 3))]) \
        == [{"sexual": 0.5, "suggestive": 0.0}]
    for bad in ("fixed:sexual=2", "fixed:sexual", "fixed:=0.1", "nonsense", "nope.mod:X",
                "serve.safety.classifier:Missing"):
        with pytest.raises(ConfigError):
            load_classifier(bad)
        with pytest.raises(ConfigError):  # at start, before any replica loads it
            check_spec(bad)
    for good in ("none", "nudenet", "fixed:sexual=1", "serve.safety.classifier:NudeNet"):
        check_spec(good)
    assert isinstance(load_classifier("serve.safety.classifier:NudeNet"), NudeNet)


# The stage through the service.


class PerImage:
    """Scores image i with scores[i] (a request's images in order)."""

    name = "per-image"

    def __init__(self, *scores: dict) -> None:
        self.scores = list(scores)

    def classify(self, images):
        assert len(images) == len(self.scores)
        return [dict(s) for s in self.scores]


class Broken:
    name = "broken"

    def classify(self, images):
        raise RuntimeError("onnxruntime: failed to run")


@pytest.fixture
def world(lock, routing, backend, tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    ledger, review = open_ledger(url), open_review(url)
    metrics = Metrics("prometheus")

    def service(classifier, **kw) -> ImageService:
        return ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                            ledger=ledger, policy=LivePolicy(load_policy_file(POLICY)),
                            review=review, classifier=LocalClassifier(classifier)
                            if classifier else None, **kw)

    def run(s: ImageService, who: Principal = ALICE, **fields):
        async def one():
            with request_scope("t", request_id=f"r{len(backend.calls)}", route="/v1/images",
                               carrier=None, metrics=metrics):
                return await s.generate(GenerateRequest(**{"prompt": "a fox", **fields}),
                                        f"r{len(backend.calls)}", who)
        return asyncio.run(one())

    def spent(who: str = "alice", plan: str = "default") -> float:
        return 100 - asyncio.run(ledger.usage(who, Budget.of(PLANS.plans[plan]))).tokens

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, labels) or 0

    class W:
        pass

    w = W()
    w.service, w.run, w.spent, w.sample, w.review, w.backend = (service, run, spent, sample,
                                                                 review, backend)
    return w


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def pixels(b64: str) -> np.ndarray:
    return decoded(base64.b64decode(b64))


def test_a_withheld_image_is_not_delivered_not_charged_and_queued_with_its_evidence(world):
    plain = world.run(world.service(FixedScores({"sexual": 0.0})), seed=5, n=2)
    one_image = plain.cost_units / 2
    before = world.spent()
    s = world.service(PerImage({"sexual": 0.8, "suggestive": 0.1}, {"sexual": 0.05}))
    r = world.run(s, seed=5, n=2)
    first, second = r.images
    assert first.b64_json is None and first.safety.action == "withhold"
    assert first.safety.category == "sexual" and first.safety.review_id
    assert second.b64_json == plain.images[1].b64_json and second.safety.action == "allow"
    assert r.cost_units == pytest.approx(one_image)  # the withheld image costs nothing
    assert world.spent() - before == pytest.approx(one_image)
    item = asyncio.run(world.review.get(first.safety.review_id))
    assert (item.kind, item.stage, item.category, item.reason) == (
        "image", "image_safety", "sexual", "sexual_content")
    assert [(i.index, i.action, i.score) for i in item.images] == [(0, "withhold", 0.8)]
    assert item.images[0].scores == {"sexual": 0.8, "suggestive": 0.1}
    assert item.classifier == "per-image" and item.prompt is None
    evidence = asyncio.run(world.review.evidence(item.id, 0))
    # the image as generated: the delivered one's pixels (those bytes add provenance)
    assert (decoded(evidence) == pixels(plain.images[0].b64_json)).all()
    assert world.sample("imagegen_image_verdicts_total", tier="draft", action="withhold",
                        category="sexual") == 1
    assert world.sample("imagegen_image_verdicts_total", tier="draft", action="allow",
                        category="none") == 3
    assert world.sample("imagegen_blocked_total", tier="draft", stage="image_safety",
                        reason="sexual_content") == 1


def test_every_image_withheld_refunds_the_whole_request(world):
    before = world.spent()
    r = world.run(world.service(FixedScores({"sexual": 0.9})), n=3)
    assert [i.safety.action for i in r.images] == ["withhold"] * 3
    assert all(i.b64_json is None and i.alt_text is None for i in r.images)
    assert r.cost_units == 0 and r.price is None and world.spent() == before
    assert len({i.safety.review_id for i in r.images}) == 1  # one case per request


def test_a_blurred_image_is_delivered_blurred_charged_and_its_case_keeps_the_original(world):
    plain = world.run(world.service(None), seed=9)
    assert plain.images[0].safety.action == "unchecked"  # no classifier configured
    r = world.run(world.service(FixedScores({"sexual": 0.55})), seed=9)
    img = r.images[0]
    assert img.safety.action == "blur" and img.b64_json is not None
    original, blurred = pixels(plain.images[0].b64_json), pixels(img.b64_json)
    assert blurred.shape == original.shape
    assert np.abs(blurred.astype(int) - original).mean() > 5  # changed...
    assert blurred.std() < original.std() * 0.8  # ...towards flat
    assert r.cost_units == plain.cost_units
    item = asyncio.run(world.review.get(img.safety.review_id))
    assert (decoded(asyncio.run(world.review.evidence(item.id, 0)))
            == pixels(plain.images[0].b64_json)).all()


def test_review_delivers_the_image_and_queues_it(world):
    r = world.run(world.service(FixedScores({"suggestive": 0.65})), seed=3)
    img = r.images[0]
    assert img.safety.action == "review" and img.b64_json is not None
    items = asyncio.run(world.review.list())
    assert [i.id for i in items] == [img.safety.review_id]
    assert items[0].reason == "image_suggestive"


def test_the_always_on_category_is_withheld_and_quarantined(world):
    r = world.run(world.service(FixedScores({"sexual_minors": 0.35, "sexual": 0.1})),
                  prompt="a teddy bear")
    img = r.images[0]
    assert img.safety.action == "withhold" and img.b64_json is None
    s = world.service(None)
    assert asyncio.run(s.review_list(RITA)) == []  # never in the general queue
    restricted = asyncio.run(s.review_list(ADMIN, restricted=True))
    assert [(i.category, i.reason, i.restricted) for i in restricted] == [
        ("sexual_minors", "csam", True)]
    assert asyncio.run(world.review.evidence(restricted[0].id, 0)) is not None  # evidence
    with pytest.raises(Forbidden):
        asyncio.run(s.review_item(RITA, restricted[0].id))


def test_a_failing_classifier_fails_closed_and_charges_nothing(world):
    before = world.spent()
    calls = len(world.backend.calls)
    with pytest.raises(ImageSafetyUnavailable) as e:
        world.run(world.service(Broken()))
    assert e.value.retry_after_s and len(world.backend.calls) == calls + 1  # generated...
    assert world.spent() == before  # ...and refunded
    r = world.run(world.service(Broken(), fail_open=True))  # configured otherwise
    assert r.images[0].safety.action == "unchecked" and r.images[0].b64_json
    assert world.spent() > before


def test_moderation_low_and_the_plans_profile_choose_the_thresholds(world):
    s = world.service(FixedScores({"sexual": 0.6}))
    assert world.run(s).images[0].safety.action == "blur"
    assert world.run(s, moderation="low").images[0].safety.action == "review"
    adult = Principal(name="bob", roles=frozenset({"user"}), plan="adult")
    assert world.run(s, who=adult).images[0].safety.action == "allow"  # review from 0.9
    kids = Principal(name="kid", roles=frozenset({"user"}), plan="kids")
    weak = world.service(FixedScores({"sexual": 0.2}))
    assert world.run(weak, who=kids, moderation="low").images[0].safety.action == "blur"


def test_a_captioner_drafts_alt_text_where_the_template_has_none(world):
    class Echo:
        async def caption(self, images, prompt):
            return [f"{prompt} ({i.shape[1]}x{i.shape[0]})" for i in images]

    s = world.service(PerImage({"sexual": 0.0}, {"sexual": 0.99}), captioner=Echo())
    r = world.run(s, prompt="a red fox", n=2, size="64x64")
    assert r.images[0].alt_text.model_dump() == {"text": "a red fox (64x64)",
                                                 "source": "captioner", "needs_review": True}
    assert r.images[1].alt_text is None  # withheld: nothing to describe


# The real classifier on real images.


def drawn(kind: str, size: tuple[int, int]) -> np.ndarray:
    """Pictures a user might ask for, drawn here: a landscape, a product shot, text."""
    w, h = size
    img = Image.new("RGB", size, (135, 190, 235))
    d = ImageDraw.Draw(img)
    if kind == "landscape":
        d.rectangle((0, h * 2 // 3, w, h), fill=(70, 140, 60))
        d.ellipse((w * 0.7, h * 0.1, w * 0.85, h * 0.25), fill=(250, 220, 90))
        d.polygon([(0, h * 2 // 3), (w // 3, h // 3), (w * 2 // 3, h * 2 // 3)],
                  fill=(120, 110, 100))
    elif kind == "product":
        img.paste((245, 245, 245), (0, 0, w, h))
        d.rounded_rectangle((w * 0.3, h * 0.2, w * 0.7, h * 0.85), radius=w // 20,
                            fill=(200, 40, 40))
        d.ellipse((w * 0.42, h * 0.1, w * 0.58, h * 0.25), fill=(30, 30, 30))
    else:
        d.text((w // 10, h // 3), "SUMMER SALE 50% OFF", fill=(20, 20, 20))
    return np.asarray(img)


@pytest.fixture(scope="module")
def nudenet():
    return load_classifier("nudenet")


def test_the_real_classifier_scores_real_images(nudenet):
    images = [drawn("landscape", (512, 512)), drawn("product", (768, 512)),
              drawn("text", (200, 1000)), drawn("landscape", (64, 64)),
              np.zeros((8, 8, 3), np.uint8)]
    scores = nudenet.classify(images)
    assert nudenet.name == "nudenet-320n"
    assert len(scores) == len(images)
    policy = load_policy_file(POLICY)
    for s in scores:
        assert set(s) == {"sexual", "suggestive"}
        assert all(0 <= v <= 1 for v in s.values())
        assert judge(s, policy.image_rules("default"), policy.always).action == "allow"
    # one image at a time scores as in a batch, and again the same
    alone = [nudenet.classify([i])[0] for i in images]
    for a, b in zip(alone, scores, strict=True):
        assert a == pytest.approx(b, abs=2e-3)
    assert nudenet.classify(images[:1]) == nudenet.classify(images[:1])
    assert nudenet.classify([]) == []


def test_the_real_classifier_sees_what_it_was_trained_on(nudenet):
    """NudeNet's detector is not blind to content: a picture's scores move with it
    (the same image mirrored and rescaled scores alike; noise differs from a flat
    field). Positive detections are exercised with fixed scores above: no test ships
    explicit images."""
    img = drawn("landscape", (512, 384))
    a = nudenet.classify([img])[0]
    b = nudenet.classify([np.ascontiguousarray(img[:, ::-1])])[0]
    c = nudenet.classify([np.asarray(Image.fromarray(img).resize((1024, 768)))])[0]
    assert a == pytest.approx(b, abs=0.05) and a == pytest.approx(c, abs=0.05)
    raw = nudenet.session.run(None, {nudenet.input: nudenet._prepare(img)[None]})[0]
    assert raw.shape[:2] == (1, 22)  # 4 box coordinates + 18 labels, per anchor


def test_a_withheld_image_is_encoded_once_as_evidence_never_for_delivery(world, monkeypatch):
    from serve import service

    seen = []
    monkeypatch.setattr(service, "encode_png", lambda i: seen.append(i.shape) or encode_png(i))
    delivered = []
    monkeypatch.setattr(service, "encode", lambda *a, **k: delivered.append(a) or b"")
    world.run(world.service(FixedScores({"sexual": 0.9})), n=2)
    assert len(seen) == 2 and delivered == []  # the evidence once each, nothing delivered


# What the review found (each would have let an image or a charge through).


def test_moderation_low_never_loosens_a_stricter_profile():
    p = parse_policy(policy_with(
        {"thresholds": {"sexual": {"withhold": 0.7}}, "low": {"sexual": {"withhold": 0.9}}},
        {"strict": {"images": {"sexual": {"withhold": 0.3}}}}), "f")
    assert p.image_rules("strict", "low")["sexual"].withhold == 0.3
    assert p.image_rules("default", "low")["sexual"].withhold == 0.9


def test_an_always_on_category_must_withhold_and_a_file_without_images_is_judged():
    with pytest.raises(ConfigError) as e:
        parse_policy(policy_with({"thresholds": {"sexual_minors": {}}}), "f")
    assert "must set withhold" in e.value.message
    spec = yaml.safe_load(POLICY.read_text())
    del spec["images"]
    p = parse_policy(yaml.safe_dump(spec), "f")  # a file from before image safety
    assert p.image_rules("default")["sexual"].withhold == 0.7


def test_one_restricted_image_withholds_the_whole_request(world):
    before = world.spent()
    s = world.service(PerImage({"sexual": 0.0}, {"sexual_minors": 0.9}))
    r = world.run(s, n=2)
    assert [(i.safety.action, i.b64_json) for i in r.images] == [("withhold", None)] * 2
    assert world.spent() == before
    case = asyncio.run(world.review.get(r.images[0].safety.review_id))
    assert case.restricted and case.category == "sexual_minors"


def test_a_captioner_that_fails_or_miscounts_never_fails_a_charged_request(world):
    class Short:
        async def caption(self, images, prompt):
            return ["only one"]  # for two images

    class Boom:
        async def caption(self, images, prompt):
            raise RuntimeError("captioner down")

    for captioner in (Short(), Boom()):
        r = world.run(world.service(FixedScores({"sexual": 0.0}), captioner=captioner), n=2)
        assert [i.alt_text for i in r.images] == [None, None] and r.price is not None

    class Seen:
        def __init__(self):
            self.images = []

        async def caption(self, images, prompt):
            self.images = images
            return ["a fox"] * len(images)

    seen = Seen()
    r = world.run(world.service(PerImage({"sexual": 0.0}, {"sexual": 0.55}),
                                captioner=seen), n=2)
    assert len(seen.images) == 1  # the blurred one is not described
    assert r.images[0].alt_text.text == "a fox" and r.images[1].alt_text is None


def test_a_review_store_that_fails_leaves_no_case_id_to_appeal_with(world, monkeypatch):
    async def down(*a, **k):
        raise RuntimeError("redis down")

    monkeypatch.setattr(world.review, "add", down)
    r = world.run(world.service(FixedScores({"sexual": 0.9})))
    assert r.images[0].safety.action == "withhold" and r.images[0].safety.review_id is None


def test_a_fail_open_image_is_counted_as_an_error_and_a_fail_closed_one_not_at_all(world):
    world.run(world.service(Broken(), fail_open=True))
    assert world.sample("imagegen_image_verdicts_total", tier="draft", action="unchecked",
                        category="error") == 1
    with pytest.raises(ImageSafetyUnavailable):
        world.run(world.service(Broken()))
    assert world.sample("imagegen_image_verdicts_total", tier="draft", action="unchecked",
                        category="error") == 1


def test_an_answer_kept_before_image_safety_replays_as_unchecked():
    from serve.schemas import Image as Wire

    old = Wire.model_validate({"seed": 1, "width": 8, "height": 8, "b64_json": "AA=="})
    assert old.safety.action == "unchecked"

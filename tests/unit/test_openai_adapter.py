"""The OpenAI adapter's translation, by table: OpenAI fields onto GenerateRequest,
the refused ones naming themselves (tests/serve/test_openai.py runs the client)."""

from __future__ import annotations

import pytest

from serve.errors import ImageBlocked, InvalidRequest
from serve.ingress.openai import OpenAIImageRequest, to_generate_request, to_openai
from serve.schemas import GenerateResponse, Image, ImageSafety, validate


def req(**fields):
    return to_generate_request(validate(OpenAIImageRequest, {"prompt": "a fox", **fields}))


@pytest.mark.parametrize(("fields", "want"), [
    ({}, {"tier": "draft", "n": 1, "size": None, "quality": None}),
    ({"model": "final"}, {"tier": "final"}),
    ({"model": "dall-e-3"}, {"tier": "final"}),
    ({"model": "dall-e-2"}, {"tier": "draft"}),
    ({"size": "auto"}, {"size": None}),
    ({"size": "128x64"}, {"size": "128x64"}),
    ({"quality": "auto"}, {"quality": "standard"}),
    ({"quality": "medium"}, {"quality": "standard"}),
    ({"quality": "hd"}, {"quality": "high"}),
    ({"quality": "low"}, {"quality": "low"}),
    ({"response_format": "b64_json", "output_format": "png", "background": "opaque"},
     {"response_format": "b64_json", "output_format": "png"}),
    ({}, {"response_format": "b64_json", "output_format": "png", "output_quality": None}),
    ({"response_format": "url"}, {"response_format": "url"}),
    ({"output_format": "webp"}, {"output_format": "webp", "output_quality": None}),
    ({"output_format": "jpeg", "output_compression": 60},
     {"output_format": "jpeg", "output_quality": 60}),
    ({"output_format": "webp", "output_compression": 0}, {"output_quality": 1}),  # 1..100
    ({"output_format": "webp", "output_compression": 100}, {"output_quality": 100}),
    ({"output_compression": 50}, {"output_format": "png", "output_quality": None}),  # as OpenAI
    ({"output_format": "png", "output_compression": 50}, {"output_quality": None}),
    ({"seed": 7, "negative_prompt": "fog", "tier": "final"},
     {"seed": 7, "negative_prompt": "fog", "tier": "final"}),
    ({"model": "dall-e-3", "tier": "final"}, {"tier": "final"}),
    ({"user": "alice@example.com", "stream": False}, {}),
    ({"moderation": "low"}, {"moderation": "low"}),  # image safety's thresholds
    ({"moderation": "auto"}, {"moderation": "auto"}),
    ({}, {"moderation": None}),
])
def test_translation(fields, want):
    got = req(**fields)
    for k, v in want.items():
        assert getattr(got, k) == v, k


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": "base64"}, "response_format"),
    ({"output_format": "avif"}, "output_format"),  # not in OpenAI's vocabulary
    ({"output_compression": 101}, "output_compression"),
    ({"output_compression": -1}, "output_compression"),
    ({"output_compression": 80.0}, "output_compression"),
    ({"background": "transparent"}, "background"),
    ({"style": "natural"}, "style"),
    ({"partial_images": 1}, "partial_images"),
    ({"stream": True}, "stream"),
    ({"model": "dall-e-3", "tier": "draft"}, "tier"),
    ({"size": "٦٤x٦٤"}, "size"),
    ({"n": True}, "n"),
    ({"frame_count": 2}, "frame_count"),
])
def test_refused_fields_name_themselves(fields, param):
    with pytest.raises(InvalidRequest) as info:
        req(**fields)
    assert info.value.details[0]["field"] == param


def test_a_models_lock_name_as_model_pins_that_revision():
    o = validate(OpenAIImageRequest, {"prompt": "a fox", "model": "tiny-final"})
    pinned = to_generate_request(o, frozenset({"tiny-draft", "tiny-final"}))
    assert (pinned.model, pinned.tier) == ("tiny-final", "draft")
    assert to_generate_request(o).tier == "tiny-final"  # not a lock name: read as a tier
    o = validate(OpenAIImageRequest, {"prompt": "a fox", "model": "tiny-final", "tier": "final"})
    assert to_generate_request(o, frozenset({"tiny-final"})).tier == "final"


def _answer(*images: Image, cached: bool = False) -> GenerateResponse:
    return GenerateResponse(id="r1", trace_id="t", created=1, tier="draft", model="m",
                            revision="x", batch_images=len(images), cost_units=0.1,
                            cached=cached, images=list(images),
                            timings={"queue_ms": 0, "generate_ms": 0, "total_ms": 1})


def test_the_answer_carries_urls_the_real_format_ids_and_cached():
    withheld = Image(id="img_2", seed=4, width=64, height=48, mime_type="image/webp",
                     safety=ImageSafety(action="withhold", category="x"))
    got = to_openai(_answer(Image(id="img_1", seed=3, width=64, height=48,
                                  mime_type="image/webp", url="https://cdn/a.webp"),
                            withheld, cached=True), None)
    assert got["data"] == [{"url": "https://cdn/a.webp"}] and got["output_format"] == "webp"
    assert (got["imagegen"]["image_ids"], got["imagegen"]["cached"]) == (["img_1"], True)
    assert got["imagegen"]["withheld"] == 1
    b64 = to_openai(_answer(Image(seed=3, width=64, height=48, b64_json="iVBO")), None)
    assert b64["data"] == [{"b64_json": "iVBO"}] and b64["output_format"] == "png"
    assert (b64["imagegen"]["image_ids"], b64["imagegen"]["cached"]) == ([None], False)
    with pytest.raises(ImageBlocked):
        to_openai(_answer(withheld), None)

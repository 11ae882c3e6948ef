"""The OpenAI adapter's translation, by table: OpenAI fields onto GenerateRequest,
the refused ones naming themselves (tests/serve/test_openai.py runs the client)."""

from __future__ import annotations

import pytest

from serve.errors import InvalidRequest
from serve.ingress.openai import OpenAIImageRequest, to_generate_request
from serve.schemas import validate


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
    ({"response_format": "b64_json", "output_format": "png", "background": "opaque"}, {}),
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
    ({"response_format": "url"}, "response_format"),
    ({"output_format": "jpeg"}, "output_format"),
    ({"output_compression": 80}, "output_compression"),
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

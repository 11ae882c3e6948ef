"""The official `openai` client against the real local stack's
POST /v1/images/generations: OpenAI's shapes both ways, its statuses and error
types (the client picks its exception class from the status alone)."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.serve


@pytest.fixture
def client(stack, api_key):
    return openai.OpenAI(base_url=f"{stack}/v1", api_key=api_key, max_retries=0)


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_n_images_as_b64_json(client):
    r = client.images.generate(prompt="a red fox in snow", n=2, response_format="b64_json")
    assert len(r.data) == 2 and r.output_format == "png" and r.size == "64x64"
    assert all(_png(d.b64_json).size == (64, 64) for d in r.data)
    extra = r.model_extra["imagegen"]
    assert extra["tier"] == "draft" and extra["model"] == "tiny-draft"
    assert extra["seeds"][1] == extra["seeds"][0] + 1


def test_model_alias_quality_and_extensions(client):
    kw = {"prompt": "a lighthouse", "model": "dall-e-3", "quality": "hd",
          "extra_body": {"seed": 11, "negative_prompt": "fog"}}
    a, b = client.images.generate(**kw), client.images.generate(**kw)
    assert a.data[0].b64_json == b.data[0].b64_json  # same seed, same image
    extra = a.model_extra["imagegen"]
    assert (extra["tier"], extra["model"], extra["seeds"]) == ("final", "tiny-final", [11])
    assert a.quality == "high"


@pytest.mark.parametrize(("kw", "param"), [
    ({"output_format": "avif"}, "output_format"),  # not in OpenAI's vocabulary
    ({"output_compression": 101}, "output_compression"),
    ({"background": "transparent"}, "background"),
    ({"style": "vivid"}, "style"),
    ({"quality": "xhigh"}, "quality"),
    ({"size": "1024x1024"}, "size"),                    # beyond tiny-draft's limits
    ({"model": "no-such-model"}, "model"),              # neither a tier nor an alias
    ({"n": 9}, "n"),
    ({"extra_body": {"complexity": "low"}}, "complexity"),  # no field is ignored
    ({"extra_body": {"seed": 1.5}}, "seed"),                # the strict wire
])
def test_every_refused_field_is_a_bad_request_naming_it(client, kw, param: str):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a fox", **kw)
    err = info.value.body
    assert info.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param
    if param not in ("size", "model"):  # those messages speak of width and tiers
        assert param in err["message"]


def test_an_unavailable_tier_is_a_server_error(client):
    with pytest.raises(openai.InternalServerError) as info:
        client.images.generate(prompt="a fox", extra_body={"tier": "broken"})
    assert info.value.status_code == 503
    assert info.value.body["code"] == "model_unavailable"
    assert info.value.response.headers["retry-after"] == "5"


def test_pinning_a_revision_where_it_is_not_allowed_is_permission_denied(client):
    # This stack does not allow pinning (tests/serve/test_failover_e2e.py does).
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.images.generate(prompt="a fox", model="tiny-final")
    assert info.value.status_code == 403
    assert info.value.body["code"] == "forbidden" and info.value.body["param"] == "model"


def test_a_bad_api_key_is_an_authentication_error(stack):
    bad = openai.OpenAI(base_url=f"{stack}/v1", api_key="ig_aaaaaaaaaaaa_" + "b" * 27,
                        max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.images.generate(prompt="a fox")
    assert info.value.status_code == 401 and info.value.body["code"] == "unauthenticated"


def test_a_plan_limit_is_permission_denied_naming_the_field(stack, stack_settings):
    import asyncio

    from serve.quotas.keys import open_keys
    from serve.quotas.principals import new_key, record_for

    key_id, key = new_key()

    async def add():
        store = open_keys(stack_settings["state_url"])
        await store.add(record_for(key, key_id, "drafter", ("user",), "drafts-only"))
        await store.close()

    asyncio.run(add())
    client = openai.OpenAI(base_url=f"{stack}/v1", api_key=key, max_retries=0)
    assert len(client.images.generate(prompt="a fox", n=2).data) == 2
    for kw, param in (({"n": 3}, "n"), ({"model": "final"}, "model")):
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.images.generate(prompt="a fox", **kw)
        assert info.value.body["code"] == "plan_limit" and info.value.body["param"] == param

"""The transport-free request path: parse_request, plan, ImageService.generate."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from serve.engines.fake import decode
from serve.errors import InvalidRequest, LimitExceeded, MalformedBody, UnknownTier
from serve.schemas import MAX_SEED, GenerateRequest, parse_request
from serve.service import plan


def req(**fields) -> GenerateRequest:
    return parse_request({"prompt": "a red fox", **fields})


# --- parse_request ---------------------------------------------------------------------

MALFORMED = [
    pytest.param(b"{", id="truncated"),
    pytest.param(b"", id="empty"),
    pytest.param(b"prompt=x", id="form-encoded"),
    pytest.param(b'{"prompt": "x",}', id="trailing-comma"),
    pytest.param(b"\xff\xfe", id="not-utf8"),
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_json_is_malformed_body(raw):
    with pytest.raises(MalformedBody) as info:
        parse_request(raw)
    assert info.value.code == "malformed_body"


# (body, field named in details, pydantic error type)
INVALID = [
    pytest.param({"prompt": "x", "colour": "red"}, "colour", "extra_forbidden", id="unknown"),
    pytest.param({}, "prompt", "missing", id="no-prompt"),
    pytest.param({"prompt": "x", "n": 0}, "n", "greater_than_equal", id="n=0"),
    pytest.param({"prompt": "x", "n": 9}, "n", "less_than_equal", id="n=9"),
    pytest.param({"prompt": ""}, "prompt", "string_too_short", id="empty-prompt"),
    pytest.param({"prompt": "   "}, "prompt", "value_error", id="blank-prompt"),
    pytest.param({"prompt": "\n\t"}, "prompt", "value_error", id="whitespace-prompt"),
    pytest.param({"prompt": "x" * 2001}, "prompt", "string_too_long", id="2001-char-prompt"),
    pytest.param({"prompt": "x", "negative_prompt": "x" * 2001}, "negative_prompt",
                 "string_too_long", id="2001-char-negative"),
    pytest.param({"prompt": "x", "size": "64x63"}, "size", "value_error", id="size-64x63"),
    pytest.param({"prompt": "x", "size": "abc"}, "size", "string_pattern_mismatch", id="size-abc"),
    pytest.param({"prompt": "x", "size": "64"}, "size", "string_pattern_mismatch", id="size-one-side"),
    pytest.param({"prompt": "x", "size": "64X64"}, "size", "string_pattern_mismatch", id="size-upper-x"),
    pytest.param({"prompt": "x", "size": "-64x64"}, "size", "string_pattern_mismatch", id="size-negative"),
    pytest.param({"prompt": "x", "size": " 64x64"}, "size", "string_pattern_mismatch", id="size-space"),
    pytest.param({"prompt": "x", "size": "640000x64"}, "size", "string_pattern_mismatch", id="size-6-digits"),
    pytest.param({"prompt": "x", "size": 64}, "size", "string_type", id="size-int"),
    pytest.param({"prompt": "x", "steps": 0}, "steps", "greater_than_equal", id="steps-0"),
    pytest.param({"prompt": "x", "steps": 501}, "steps", "less_than_equal", id="steps-501"),
    pytest.param({"prompt": "x", "guidance": -1}, "guidance", "greater_than_equal",
                 id="guidance-neg"),
    pytest.param({"prompt": "x", "response_format": "ftp"}, "response_format", "literal_error",
                 id="response-format-ftp"),
    pytest.param({"prompt": "x", "output_format": "gif"}, "output_format", "literal_error",
                 id="output-format-gif"),
    pytest.param({"prompt": "x", "aspect_ratios": ["16/9"]}, "aspect_ratios.0",
                 "string_pattern_mismatch", id="aspect-ratio-slash"),
    pytest.param({"prompt": "x", "seed": -1}, "seed", "greater_than_equal", id="seed-neg"),
    pytest.param({"prompt": "x", "seed": 2**32}, "seed", "less_than_equal", id="seed-2**32"),
    pytest.param({"prompt": "x", "tier": ""}, "tier", "string_too_short", id="tier-empty"),
    pytest.param({"prompt": "x", "n": 1.5}, "n", "int_type", id="n-fraction"),
    # The strict wire: no coercion between bools, numbers and strings.
    pytest.param({"prompt": "x", "guidance": False}, "guidance", "float_type", id="guidance-bool"),
    pytest.param({"prompt": "x", "seed": 383385.0}, "seed", "int_type", id="seed-float"),
    pytest.param({"prompt": "x", "n": True}, "n", "int_type", id="n-bool"),
    pytest.param({"prompt": "x", "steps": "4"}, "steps", "int_type", id="steps-string"),
    pytest.param({"prompt": "x", "size": "\u0666\u0664x\u0666\u0664"}, "size",
                 "string_pattern_mismatch", id="size-arabic-indic-digits"),
    pytest.param({"prompt": "x", "size": "\uff16\uff14x64"}, "size", "string_pattern_mismatch",
                 id="size-fullwidth-digits"),
    pytest.param({"prompt": "a\x00b"}, "prompt", "value_error", id="prompt-nul"),
    pytest.param({"prompt": "a\x1bb"}, "prompt", "value_error", id="prompt-escape"),
    pytest.param({"prompt": "a\x85b"}, "prompt", "value_error", id="prompt-c1-control"),
    pytest.param({"prompt": "a", "negative_prompt": "\x07"}, "negative_prompt", "value_error",
                 id="negative-bell"),
]


def test_newline_and_tab_are_text():
    assert parse_request({"prompt": "a fox\n\tin snow\r\n"}).prompt == "a fox\n\tin snow\r\n"


@pytest.mark.parametrize(("raw", "needle"), [
    pytest.param(b'{"prompt": "x", "seed": 1, "seed": 2}', "duplicate key 'seed'", id="dup-key"),
    pytest.param(b'{"prompt": "x", "guidance": NaN}', "NaN", id="nan"),
    pytest.param(b'{"prompt": "x", "guidance": Infinity}', "Infinity", id="infinity"),
    pytest.param(b'{"prompt": "x", "guidance": -Infinity}', "Infinity", id="minus-infinity"),
    pytest.param(b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "digits", id="5000-digits"),
    pytest.param(b'{"prompt": "\xff\xfe"}', "utf-8", id="invalid-utf8"),
    pytest.param('{"prompt": "x"}'.encode("utf-16"), "utf-8", id="utf-16"),
    pytest.param(b'\xef\xbb\xbf{"prompt": "x"}', "BOM", id="utf-8-bom"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deep-nesting"),
])
def test_hostile_json_is_a_malformed_body(raw, needle):
    with pytest.raises(MalformedBody) as info:
        parse_request(raw)
    assert needle.lower() in info.value.message.lower()


def test_a_lone_surrogate_is_refused():
    with pytest.raises(InvalidRequest) as info:
        parse_request(b'{"prompt": "a\\ud800b"}')
    assert info.value.details[0]["field"] == "prompt"


@pytest.mark.parametrize(("body", "field", "kind"), INVALID)
@pytest.mark.parametrize("as_bytes", [False, True], ids=["dict", "json"])
def test_invalid_request_names_the_field(body, field, kind, as_bytes):
    with pytest.raises(InvalidRequest) as info:
        parse_request(json.dumps(body).encode() if as_bytes else body)
    err = info.value
    assert type(err) is InvalidRequest and err.code == "invalid_request"
    assert [(d["field"], d["type"]) for d in err.details] == [(field, kind)]
    assert field in err.message


def test_invalid_request_lists_every_bad_field():
    with pytest.raises(InvalidRequest) as info:
        parse_request({"prompt": "x", "n": 0, "steps": 0, "bogus": 1})
    assert sorted(d["field"] for d in info.value.details) == ["bogus", "n", "steps"]


def test_non_object_body_is_invalid_request():
    with pytest.raises(InvalidRequest) as info:
        parse_request(b"[1, 2]")
    assert info.value.details[0]["field"] == "body"


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ({"prompt": "x"}, {"tier": "draft", "n": 1, "size": None, "seed": None,
                           "response_format": "b64_json", "negative_prompt": ""}),
        ({"prompt": "x", "size": "64x48", "seed": 0, "n": 8, "steps": 500, "guidance": 50},
         {"size": "64x48", "seed": 0, "n": 8, "steps": 500, "guidance": 50.0}),
        ({"prompt": "x" * 2000, "seed": MAX_SEED}, {"seed": MAX_SEED}),
        # 0x64 is well-formed (multiples of 8): the model's min_size rejects it in plan()
        ({"prompt": "x", "size": "0x64"}, {"size": "0x64"}),
    ],
)
def test_valid_requests_parse(body, expect):
    got = parse_request(json.dumps(body).encode())
    for k, v in expect.items():
        assert getattr(got, k) == v


# --- plan ------------------------------------------------------------------------------

# tiny-draft: defaults 64x48, 4 steps, guidance 7.5; limits min 32, max 256x128,
#             50 steps, guidance 20, 4 images.
# tiny-final: defaults 96x96, 8 steps, guidance 5; limits min 64, max 512x512,
#             100 steps, guidance 10, 8 images.
RESOLVED = [
    pytest.param({}, ("tiny-draft", 64, 48, 4, 7.5), id="draft-defaults"),
    pytest.param({"tier": "final"}, ("tiny-final", 96, 96, 8, 5.0), id="final-defaults"),
    pytest.param({"size": "128x32"}, ("tiny-draft", 128, 32, 4, 7.5), id="size-only"),
    pytest.param({"steps": 50}, ("tiny-draft", 64, 48, 50, 7.5), id="steps-at-max"),
    pytest.param({"guidance": 0}, ("tiny-draft", 64, 48, 4, 0.0), id="guidance-zero-kept"),
    pytest.param({"guidance": 20}, ("tiny-draft", 64, 48, 4, 20.0), id="guidance-at-max"),
    pytest.param({"size": "32x32"}, ("tiny-draft", 32, 32, 4, 7.5), id="min-size"),
    pytest.param({"size": "256x128"}, ("tiny-draft", 256, 128, 4, 7.5), id="max-size"),
    pytest.param({"tier": "final", "size": "512x64", "steps": 1, "guidance": 10},
                 ("tiny-final", 512, 64, 1, 10.0), id="final-explicit"),
]


@pytest.mark.parametrize(("fields", "want"), RESOLVED)
def test_plan_applies_defaults_and_keeps_explicit_values(lock, routing, fields, want):
    p = plan(req(seed=7, **fields), lock, routing)
    model, w, h, steps, guidance = want
    assert p.entry.name == model
    assert p.tier == fields.get("tier", "draft")
    assert [(j.width, j.height, j.steps, j.guidance) for j in p.jobs] == [(w, h, steps, guidance)]
    assert p.jobs[0].prompt == "a red fox"


def test_plan_passes_negative_prompt(lock, routing):
    p = plan(req(negative_prompt="blurry", n=2), lock, routing)
    assert [j.negative_prompt for j in p.jobs] == ["blurry", "blurry"]


# (fields, substrings of the LimitExceeded message)
OVER = [
    pytest.param({"size": "24x48"}, ["width 24", "tiny-draft"], id="width-below-min"),
    pytest.param({"size": "64x24"}, ["height 24", "tiny-draft"], id="height-below-min"),
    pytest.param({"size": "0x64"}, ["width 0", "tiny-draft"], id="width-zero"),
    pytest.param({"size": "264x64"}, ["width 264", "tiny-draft"], id="width-above-max"),
    pytest.param({"size": "64x136"}, ["height 136", "tiny-draft"], id="height-above-max"),
    pytest.param({"tier": "final", "size": "56x96"}, ["width 56", "tiny-final"],
                 id="final-min-size-is-its-own"),
    pytest.param({"tier": "final", "size": "96x520"}, ["height 520", "tiny-final"],
                 id="final-height-above-max"),
    pytest.param({"steps": 51}, ["steps 51", "50", "tiny-draft"], id="steps"),
    pytest.param({"tier": "final", "steps": 101}, ["steps 101", "tiny-final"], id="final-steps"),
    pytest.param({"guidance": 20.5}, ["guidance 20.5", "tiny-draft"], id="guidance"),
    pytest.param({"tier": "final", "guidance": 10.5}, ["guidance 10.5", "tiny-final"],
                 id="final-guidance"),
    pytest.param({"n": 5}, ["n 5", "4", "tiny-draft"], id="n"),
]


@pytest.mark.parametrize(("fields", "needles"), OVER)
def test_plan_rejects_values_over_the_models_limits(lock, routing, fields, needles):
    with pytest.raises(LimitExceeded) as info:
        plan(req(**fields), lock, routing)
    for needle in needles:
        assert needle in info.value.message


def test_plan_n_within_the_final_models_limit(lock, routing):
    assert len(plan(req(tier="final", n=8), lock, routing).jobs) == 8


def test_plan_unknown_tier(lock, routing):
    with pytest.raises(UnknownTier, match="known tiers: draft, final"):
        plan(req(tier="gold"), lock, routing)


@pytest.mark.parametrize(
    ("seed", "n", "seeds"),
    [
        (0, 1, [0]),
        (10, 3, [10, 11, 12]),
        (MAX_SEED, 1, [MAX_SEED]),
        (MAX_SEED, 3, [MAX_SEED, 0, 1]),
        (MAX_SEED - 1, 4, [MAX_SEED - 1, MAX_SEED, 0, 1]),
    ],
)
def test_plan_seeds_count_up_and_wrap(lock, routing, seed, n, seeds):
    p = plan(req(tier="final", seed=seed, n=n), lock, routing)
    assert [j.seed for j in p.jobs] == seeds


def test_plan_draws_a_seed_in_range_when_absent(lock, routing):
    firsts = set()
    for _ in range(20):
        jobs = plan(req(n=4), lock, routing).jobs
        first = jobs[0].seed
        assert 0 <= first <= MAX_SEED
        assert [j.seed for j in jobs] == [(first + i) % 2**32 for i in range(4)]
        firsts.add(first)
    assert len(firsts) > 1  # drawn, not a constant


# --- ImageService.generate -------------------------------------------------------------


def _decode_png(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


@pytest.mark.parametrize(
    ("fields", "model", "w", "h"),
    [
        pytest.param({"seed": 5, "n": 3}, "tiny-draft", 64, 48, id="draft-three"),
        pytest.param({"tier": "final", "seed": MAX_SEED, "n": 2, "size": "64x128"},
                     "tiny-final", 64, 128, id="final-wrapping-seed"),
        # over the inline-encode threshold: exercises the thread-pool path
        pytest.param({"tier": "final", "seed": 1, "n": 2, "size": "512x256"},
                     "tiny-final", 512, 256, id="encode-off-loop"),
    ],
)
def test_generate_returns_the_routed_revisions_images(service, lock, backend, fields, model,
                                                      w, h):
    request = req(**fields)
    resp = asyncio.run(service.generate(request, "rid-1"))
    entry = lock.get(model)
    assert (resp.id, resp.tier, resp.model) == ("rid-1", request.tier, model)
    assert resp.revision == entry.revision
    assert resp.batch_images == request.n
    want_seeds = [(request.seed + i) % 2**32 for i in range(request.n)]
    assert [i.seed for i in resp.images] == want_seeds
    for image, seed in zip(resp.images, want_seeds, strict=True):
        assert (image.width, image.height, image.mime_type) == (w, h, "image/png")
        pixels = _decode_png(image.b64_json)
        assert pixels.shape == (h, w, 3)
        assert decode(pixels) == (entry.revision[:12], seed)
    assert [m for m, _ in backend.calls] == [model]
    t = resp.timings
    assert t.queue_ms >= 0 and t.generate_ms >= 0 and t.total_ms >= t.generate_ms


def test_generate_is_reproducible_by_seed(service):
    a = asyncio.run(service.generate(req(seed=42, n=2), "a"))
    b = asyncio.run(service.generate(req(seed=43), "b"))
    assert a.images[1].b64_json == b.images[0].b64_json
    assert a.images[0].b64_json != a.images[1].b64_json


def test_generate_rejects_before_calling_the_backend(service, backend):
    with pytest.raises(LimitExceeded):
        asyncio.run(service.generate(req(size="1024x1024"), "r"))
    assert backend.calls == []


def test_models_lists_each_revision_with_its_tiers(service, lock):
    infos = {m.name: m for m in service.models()}
    assert set(infos) == {"tiny-draft", "tiny-final"}
    for name, tier in (("tiny-draft", "draft"), ("tiny-final", "final")):
        entry = lock.get(name)
        assert infos[name].tiers == [tier]
        assert infos[name].revision == entry.revision
        assert infos[name].deployment == entry.deployment_name
        assert infos[name].limits == entry.limits

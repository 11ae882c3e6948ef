"""Stages 6 and 11 through ImageService over a real local store: every image kept
with its own id and sidecar, readable by its owner (anyone else: not found);
identical requests answered from the store at the plan's cache price without a model
(counted), concurrent ones collapsed into one generation, another principal's never
a hit; formats, aspect ratios, signed links, rerolls; the store down is 503 and
refunded; a changed policy makes a stored image a miss."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from serve.config import ROOT
from serve.errors import NotFound, StorageUnavailable
from serve.imaging import read_xmp
from serve.quotas.ledger import Budget, open_ledger
from serve.quotas.plans import Plans
from serve.quotas.principals import Principal
from serve.routing import LiveRouting
from serve.safety.classifier import FixedScores, LocalClassifier
from serve.safety.policy import LivePolicy, load_policy_file
from serve.schemas import GenerateRequest
from serve.service import ImageService
from serve.storage.results import Results
from serve.storage.store import open_store
from serve.telemetry import Metrics, request_scope

PLANS = Plans.model_validate({"plans": {
    "default": {"tiers": ["draft", "final"], "bucket": {"burst": 100, "refill_per_s": 0},
                "cache_hit_fraction": 0.1},
    "marked": {"tiers": ["draft", "final"], "bucket": {"burst": 100, "refill_per_s": 0},
               "watermark": True}}})
ALICE = Principal(name="alice", roles=frozenset({"user"}), plan="default")
BOB = Principal(name="bob", roles=frozenset({"user"}), plan="default")
ADMIN = Principal(name="root", roles=frozenset({"admin"}), plan="default")
POLICY = ROOT / "serve" / "safety" / "prompt_policy.yaml"


@pytest.fixture
def world(lock, routing, backend, tmp_path):
    url = f"sqlite://{tmp_path / 'state.db'}"
    ledger = open_ledger(url)
    metrics = Metrics("prometheus")
    store = open_store(f"file://{tmp_path / 'images'}")
    policy = LivePolicy(load_policy_file(POLICY))

    class W:
        pass

    w = W()
    w.backend, w.store, w.policy, w.metrics = backend, store, policy, metrics
    w.service = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                             ledger=ledger, policy=policy,
                             classifier=LocalClassifier(FixedScores({"sexual": 0.01})),
                             results=Results(store, b"s" * 32))

    def run(who=ALICE, **fields):
        async def one():
            with request_scope("t", request_id="r", route="/v1/images", carrier=None,
                               metrics=metrics):
                return await w.service.generate(
                    GenerateRequest(**{"prompt": "a red fox", **fields}), "r", who)
        return asyncio.run(one())

    def spent(who="alice", plan="default"):
        return 100 - asyncio.run(ledger.usage(who, Budget.of(PLANS.plans[plan]))).tokens

    w.run, w.spent = run, spent
    w.hits = lambda: metrics.registry.get_sample_value("imagegen_cache_hits_total",
                                                       {"tier": "draft"}) or 0
    return w


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_every_image_is_kept_with_its_own_sidecar_for_its_owner_only(world):
    r = world.run(seed=7, n=2, approval_id="JIRA-42")
    a, b = r.images
    assert a.id != b.id and a.id.startswith("img_")
    record, url = asyncio.run(world.service.image(ALICE, a.id))
    assert (record.seed, record.approval_id, record.safety.action) == (7, "JIRA-42", "allow")
    assert record.recipe.prompt == "a red fox" and record.recipe.seed == 7
    assert record.request["prompt"] == "a red fox" and "seed" not in record.request
    assert record.cost_units == pytest.approx(r.cost_units / 2)
    assert record.expires is not None  # the plan's retention (30 days)
    assert url.startswith("/v1/files/objects/")
    for stranger in (BOB,):
        with pytest.raises(NotFound):
            asyncio.run(world.service.image(stranger, a.id))
    assert asyncio.run(world.service.image(ADMIN, a.id))[0].id == a.id
    with pytest.raises(NotFound):
        asyncio.run(world.service.image(ALICE, "img_" + "0" * 24))
    with pytest.raises(NotFound):
        asyncio.run(world.service.image(ALICE, "../../etc/passwd"))


def test_an_identical_request_is_a_hit_without_a_model_at_the_cache_price(world):
    first = world.run(seed=11, n=2)
    calls, spent = len(world.backend.calls), world.spent()
    again = world.run(seed=11, n=2)
    assert again.cached and not first.cached
    assert len(world.backend.calls) == calls  # no model call
    assert world.hits() == 1
    assert [i.b64_json for i in again.images] == [i.b64_json for i in first.images]
    assert {i.id for i in again.images}.isdisjoint({i.id for i in first.images})
    assert again.cost_units == pytest.approx(first.cost_units * 0.1, abs=1e-6)
    assert world.spent() - spent == pytest.approx(first.cost_units * 0.1, abs=1e-6)
    record, _ = asyncio.run(world.service.image(ALICE, again.images[0].id))
    assert record.cached  # its own sidecar, marked


def test_no_seed_is_never_a_hit_and_another_principal_is_never_a_hit(world):
    world.run()
    world.run()
    assert world.hits() == 0
    mine = world.run(seed=3)
    theirs = world.run(BOB, seed=3)
    assert not theirs.cached and world.hits() == 0
    assert theirs.images[0].b64_json == mine.images[0].b64_json  # same recipe, own copy
    with pytest.raises(NotFound):
        asyncio.run(world.service.image(BOB, mine.images[0].id))


def test_concurrent_identical_requests_make_one_generation(world, backend):
    engine = backend.engines["tiny-draft"]
    real = engine.generate

    def slow(jobs):
        time.sleep(0.2)
        return real(jobs)

    engine.generate = slow

    async def many():
        async def one():
            return await world.service.generate(
                GenerateRequest(prompt="a red fox", seed=5), "r", ALICE)
        return await asyncio.gather(*(one() for _ in range(6)))

    out = asyncio.run(many())
    assert len(backend.calls) == 1  # one leader generated
    assert sum(r.cached for r in out) == 5
    assert len({r.images[0].b64_json for r in out}) == 1


def test_formats_are_encoded_with_provenance_and_their_mime_type(world):
    for fmt, mime in (("webp", "image/webp"), ("avif", "image/avif"), ("jpeg", "image/jpeg"),
                      ("png", "image/png")):
        r = world.run(seed=2, output_format=fmt, output_quality=70 if fmt != "png" else None,
                      size="128x64")
        img = r.images[0]
        assert img.mime_type == mime
        pil = decode(img.b64_json)
        assert pil.size == (128, 64) and pil.format.lower() == fmt.replace("jpeg", "jpeg")
        assert "trainedAlgorithmicMedia" in read_xmp(base64.b64decode(img.b64_json))
    # another format is another recipe: a miss
    assert world.hits() == 0


def test_aspect_ratios_share_the_seed_and_are_tagged(world):
    r = world.run(seed=9, n=2, aspect_ratios=["1:1", "2:1"], megapixels=0.004)
    assert [(i.aspect_ratio, i.seed) for i in r.images] == [
        ("1:1", 9), ("1:1", 10), ("2:1", 9), ("2:1", 10)]
    square, wide = r.images[0], r.images[2]
    assert square.width == square.height and wide.width == 2 * wide.height
    assert all(i.width % 8 == 0 and i.height % 8 == 0 for i in r.images)


def test_a_url_is_a_signed_link_the_service_serves_and_nobody_can_forge(world):
    r = world.run(seed=4, response_format="url")
    img = r.images[0]
    assert img.b64_json is None and img.url.startswith("/v1/files/objects/")
    path, _, query = img.url.removeprefix("/v1/files/").partition("?")
    args = dict(p.split("=") for p in query.split("&"))
    data, mime = asyncio.run(world.service.file(path, int(args["expires"]), args["sig"]))
    assert mime == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in ((path, int(args["expires"]), "0" * 32), (path, int(args["expires"]) + 1,
                                                           args["sig"]),
                (path.replace(".png", ".json"), int(args["expires"]), args["sig"]),
                (path, int(time.time()) - 5, args["sig"]),
                (path, 7212893561414494369873920, args["sig"]),  # what the fuzzer sent
                ("!A\U0001e5b0", int(args["expires"]), "\u00be\u008d" * 16),
                (path, int(args["expires"]), "é" * 32)):
        with pytest.raises(NotFound):
            asyncio.run(world.service.file(*bad))


def test_a_reroll_regenerates_the_stored_request_with_a_new_seed(world):
    first = world.run(seed=20, size="128x64", output_format="webp")
    again = asyncio.run(world.service.reroll(ALICE, first.images[0].id, "r2"))
    img = again.images[0]
    assert img.seed != 20 and (img.width, img.height) == (128, 64)
    assert img.mime_type == "image/webp"
    same = asyncio.run(world.service.reroll(ALICE, first.images[0].id, "r3", seed=20))
    assert same.cached and same.images[0].b64_json == first.images[0].b64_json
    with pytest.raises(NotFound):
        asyncio.run(world.service.reroll(BOB, first.images[0].id, "r4"))


def test_the_store_down_is_503_refunded_and_leaves_no_sidecar(world, monkeypatch):
    spent = world.spent()

    async def down(*a, **k):
        raise StorageUnavailable("disk full")

    monkeypatch.setattr(world.store, "put", down)
    with pytest.raises(StorageUnavailable) as e:
        world.run(seed=30)
    assert e.value.retry_after_s == 5 and world.spent() == spent
    assert asyncio.run(world.store.keys("images/")) == []


def test_a_record_that_fails_beside_its_sidecar_leaves_no_sidecar_and_no_record(
        world, monkeypatch):
    """Records and sidecars are written at once (one round of writes, not two): a
    record that fails after its sidecar landed takes the sidecar back out."""
    spent, put = world.spent(), world.store.put
    sidecars_written = []

    async def records_down(key, *a, **k):
        if key.startswith("objects/") and key.endswith(".json"):
            await asyncio.sleep(0.05)  # the sidecar lands first
            raise StorageUnavailable("records down")
        await put(key, *a, **k)
        if key.startswith("images/"):
            sidecars_written.append(key)

    monkeypatch.setattr(world.store, "put", records_down)
    with pytest.raises(StorageUnavailable):
        world.run(seed=31)
    assert sidecars_written and world.spent() == spent
    assert asyncio.run(world.store.keys("images/")) == []
    assert not [k for k in asyncio.run(world.store.keys("objects/")) if k.endswith(".json")]


def test_a_request_cancelled_while_its_record_is_written_leaves_no_sidecar(
        world, monkeypatch):
    """The caller goes away after its sidecar landed, its record still in flight (it
    lands after the cancel, as a store's thread write does): the sidecar is taken
    back out once the writes end (an image without all of it kept has no id)."""
    put = world.store.put

    async def slow_records(key, *a, **k):
        if key.startswith("objects/") and key.endswith(".json"):
            await asyncio.sleep(0.5)  # in flight when the caller leaves
        await put(key, *a, **k)

    async def main():
        monkeypatch.setattr(world.store, "put", slow_records)
        with request_scope("t", request_id="r", route="/v1/images", carrier=None,
                           metrics=world.metrics):
            task = asyncio.create_task(world.service.generate(
                GenerateRequest(prompt="a red fox", seed=32), "r", ALICE))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if await world.store.keys("images/"):
                    break
            assert await world.store.keys("images/")  # the sidecar landed
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        records = [k for k in await world.store.keys("objects/") if k.endswith(".json")]
        return await world.store.keys("images/"), records

    sidecars, records = asyncio.run(main())
    assert sidecars == [] and records  # the record landed after the cancel


def test_a_stricter_policy_makes_a_stored_image_a_miss_and_a_blur_is_never_a_hit(world):
    def thresholds(line: str, version: int) -> None:
        assert world.policy.apply_text(POLICY.read_text().replace(
            "version: 2", f"version: {version}").replace(
            "    sexual: {review: 0.3, blur: 0.5, withhold: 0.7}", line, 1), "file p")

    plain = world.run(seed=40, response_format="url")
    calls = len(world.backend.calls)
    thresholds("    sexual: {review: 0.01, blur: 0.5, withhold: 0.7}", 3)
    r = world.run(seed=40)  # still delivered as generated: a hit, judged anew
    assert r.cached and r.images[0].safety.action == "review"
    thresholds("    sexual: {blur: 0.01, withhold: 0.7}", 4)
    blurred = world.run(seed=40, response_format="url")
    assert not blurred.cached and len(world.backend.calls) == calls + 1
    assert blurred.images[0].safety.action == "blur"
    assert blurred.images[0].url != plain.images[0].url  # never the unblurred bytes
    assert not world.run(seed=40).cached  # a blurred image is never a hit


def test_a_watermark_plan_marks_each_image_with_its_id(world, lock, routing, backend):
    from serve.imaging import watermark

    marked = Principal(name="carol", roles=frozenset({"user"}), plan="marked")
    r = world.run(marked, seed=1, size="256x128", model=None, tier="final")
    img = r.images[0]
    pixels = np.asarray(decode(img.b64_json).convert("RGB"))
    if watermark.markable(pixels):
        assert watermark.detect(pixels, 12) == bytes.fromhex(img.id[4:])
    else:  # under 256x256: the visible mark instead
        plain = world.run(seed=1, size="256x128", tier="final")
        assert (np.asarray(decode(plain.images[0].b64_json).convert("RGB")) != pixels).any()


def test_gc_removes_expired_images_and_the_objects_nothing_names(world, capsys):
    import datetime as dt

    from serve.cli.storage import gc
    from serve.storage.records import object_key

    old = world.run(seed=50)  # shares nothing with the next
    kept = world.run(seed=51)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=31)  # past the 30 days
    # a sidecar that lives on names its object: only expired ones are touched
    record, _ = asyncio.run(world.service.image(ALICE, kept.images[0].id))
    asyncio.run(world.store.put(f"images/{record.id}.json",
                                record.model_copy(update={"expires": None})
                                .model_dump_json().encode(), "application/json"))
    dry = asyncio.run(gc(world.store, dry_run=True, now=later))
    assert dry == {"sidecars": 1, "objects": 1, "kept": 1}
    assert asyncio.run(gc(world.store, now=later)) == dry
    with pytest.raises(NotFound):
        asyncio.run(world.service.image(ALICE, old.images[0].id))
    assert asyncio.run(world.service.image(ALICE, kept.images[0].id))[0].id == record.id
    assert asyncio.run(world.store.exists(object_key(record.key, "png")))
    assert not world.run(seed=50).cached  # its object went with it
    young = asyncio.run(gc(world.store, now=dt.datetime.now(dt.UTC)))
    assert young["objects"] == 0  # within the grace period: a request may be naming it


def test_on_s3_a_hit_and_a_presigned_link_fetched_for_real(lock, routing, backend, tmp_path,
                                                           moto_s3):
    import httpx
    from moto_s3 import BUCKET

    moto_s3.empty()
    store = open_store(f"s3://{BUCKET}/stage", endpoint_url=moto_s3.endpoint, sse="AES256")
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                     ledger=open_ledger(f"sqlite://{tmp_path / 'state.db'}"),
                     results=Results(store, b"k" * 32, url_ttl_s=120))

    def run(**fields):
        return asyncio.run(s.generate(GenerateRequest(prompt="a red fox", **fields), "r",
                                      ALICE))

    first = run(seed=8, response_format="url", output_format="avif")
    url = first.images[0].url
    assert "X-Amz-Expires=120" in url and url.startswith(moto_s3.endpoint)
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200 and got.headers["content-type"] == "image/avif"
    assert Image.open(io.BytesIO(got.content)).size == (first.images[0].width,
                                                        first.images[0].height)
    calls = len(backend.calls)
    again = run(seed=8, response_format="url", output_format="avif")
    assert again.cached and len(backend.calls) == calls
    head = moto_s3.admin.head_object(Bucket=BUCKET, Key=url.split(f"/{BUCKET}/", 1)[1]
                                     .split("?")[0])
    assert head["ServerSideEncryption"] == "AES256"
    assert head["CacheControl"] == "private, max-age=31536000, immutable"  # no CDN: no
    # shared cache may keep one caller's image
    record, _ = asyncio.run(s.image(ALICE, first.images[0].id))
    assert record.mime_type == "image/avif"


def test_a_restricted_images_sidecar_keeps_its_texts_as_hashes(world, lock, routing, backend,
                                                               tmp_path):
    from serve.safety.review import sha256

    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                     policy=world.policy,
                     classifier=LocalClassifier(FixedScores({"sexual_minors": 0.9})),
                     results=world.service.results)
    r = asyncio.run(s.generate(GenerateRequest(prompt="a teddy bear", seed=3), "r", ALICE))
    assert r.images[0].safety.action == "withhold"
    record, url = asyncio.run(s.image(ALICE, r.images[0].id))
    assert url is None and record.recipe.prompt == sha256("a teddy bear")
    assert "prompt" not in record.request


def test_duplicate_aspect_ratios_are_refused_not_charged_twice(world):
    from serve.errors import InvalidRequest

    for ratios in (["1:1", "1:1"], ["2:1", "4:2"]):
        with pytest.raises(InvalidRequest) as e:
            world.run(seed=1, aspect_ratios=ratios)
        assert e.value.details[0]["type"] == "duplicate"


def test_a_configured_signer_puts_c2pa_credentials_in_every_delivered_image(
        world, lock, routing, backend, tmp_path):
    pytest.importorskip("c2pa")
    from c2pa_certs import issue

    from serve.app import c2pa_of
    from serve.config import load_settings
    from serve.errors import ConfigError
    from serve.imaging.encode import DIGITAL_SOURCE_TYPE
    from serve.imaging.provenance import C2paSigner, read_manifest

    creds = issue(tmp_path / "c2pa")
    s = ImageService(lock, LiveRouting(routing, lock, "file t"), backend, plans=PLANS,
                     results=world.service.results, c2pa=C2paSigner(creds.chain, creds.key))
    for fmt, mime in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
        r = asyncio.run(s.generate(GenerateRequest(prompt="a secret prompt", seed=6,
                                                   output_format=fmt), "r", ALICE))
        data = base64.b64decode(r.images[0].b64_json)
        manifest = read_manifest(data, mime)
        assert DIGITAL_SOURCE_TYPE in json.dumps(manifest)
        assert "a secret prompt" not in json.dumps(manifest)
        assert b"a secret prompt" not in data
        record, _ = asyncio.run(s.image(ALICE, r.images[0].id))
        assert record.recipe.c2pa  # another recipe than the unsigned one: no stale hit
    other = issue(tmp_path / "other")
    with pytest.raises(ConfigError):  # a key that does not fit its certificate
        c2pa_of(load_settings(c2pa_cert_file=creds.chain, c2pa_key_file=other.key))
    with pytest.raises(ConfigError):
        c2pa_of(load_settings(c2pa_cert_file=creds.chain))

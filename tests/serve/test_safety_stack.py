"""The prompt policy through the real stack and its real clients: a blocked prompt is
refused on HTTP, the openai client and gRPC, names its category, and reaches no
model; a new policy version applies live, a bad one is refused and the last good
one keeps serving."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.serve


def test_a_blocked_prompt_is_refused_on_every_transport(stack, stack_settings, auth_headers,
                                                       api_key):
    import grpc
    import openai
    from grpc_key import keyed_channel

    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc

    r = httpx.post(f"{stack}/v1/images", json={"prompt": "a n.u.d.e figure"},
                   headers=auth_headers, timeout=30)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "prompt_blocked"
    assert r.json()["error"]["details"] == [{"field": "prompt", "type": "sexual_content"}]
    client = openai.OpenAI(base_url=f"{stack}/v1", api_key=api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a sw@stika banner", model="draft")
    assert e.value.code == "prompt_blocked"
    with (keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", api_key) as ch,
          pytest.raises(grpc.RpcError) as g):
        pb_grpc.ImagesStub(ch).Generate(pb.GenerateRequest(prompt="a g0re scene"),
                                        timeout=30)
    assert g.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert dict(g.value.trailing_metadata())["imagegen-code"] == "prompt_blocked"


def test_a_new_policy_version_applies_live_and_a_bad_one_is_refused(stack, stack_settings,
                                                                    auth_headers):
    path = Path(stack_settings["prompt_policy_file"])
    good = path.read_text()

    def status(prompt: str) -> int:
        return httpx.post(f"{stack}/v1/images", json={"prompt": prompt}, headers=auth_headers,
                          timeout=30).status_code

    def eventually(prompt: str, want: int) -> None:
        deadline = time.monotonic() + 15
        while status(prompt) != want:
            assert time.monotonic() < deadline, f"{prompt!r} never answered {want}"
            time.sleep(0.3)

    try:
        assert status("a teddy bear") == 200
        path.write_text(good.replace("version: 2", "version: 3").replace(
            "  sexual_minors:", "  toys:\n    reason: toys\n    terms: [teddy bear]\n"
            "  sexual_minors:", 1))
        eventually("a t3ddy bear", 403)
        path.write_text("version: 3\ncategories: [not, a, map]\n")  # refused: v2 stays
        time.sleep(1.5)
        assert status("a teddy bear") == 403 and status("a red fox") == 200
    finally:
        path.write_text(good)
    eventually("a teddy bear", 200)


def test_images_are_classified_and_a_flagged_one_is_withheld_on_every_transport(
        stack, stack_settings, auth_headers, api_key):
    """The real classifier in its own deployment scores every image; a policy that
    withholds from score 0 (applied live) withholds them all: HTTP answers each
    image's verdict, the openai client gets image_blocked, gRPC an empty image with
    its verdict; the case is in the review queue with the image as evidence, and
    nothing is charged."""
    import grpc  # noqa: F401 - the channel helper needs it
    import openai
    from grpc_key import keyed_channel

    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc

    ready = httpx.get(f"{stack}/readyz", timeout=10).json()
    assert ready["image_safety"] == {"classifier": "nudenet-320n", "ready": True,
                                     "reason": None}
    body = {"prompt": "a lighthouse at dusk", "seed": 11}
    r = httpx.post(f"{stack}/v1/images", json=body, headers=auth_headers, timeout=60)
    assert r.status_code == 200
    assert r.json()["images"][0]["safety"] == {"action": "allow", "category": None,
                                               "review_id": None}
    client = openai.OpenAI(base_url=f"{stack}/v1", api_key=api_key, max_retries=0)
    shown = client.images.generate(prompt="a lighthouse at dusk", model="draft",
                                   moderation="low")  # honoured now: the low thresholds
    assert shown.data[0].b64_json and shown.model_extra["imagegen"]["safety"] == [
        {"action": "allow"}]
    path = Path(stack_settings["prompt_policy_file"])
    good = path.read_text()
    try:
        path.write_text(good.replace("version: 2", "version: 4").replace(
            "    sexual: {review: 0.3, blur: 0.5, withhold: 0.7}",
            "    sexual: {withhold: 0.0}", 1))
        deadline = time.monotonic() + 15
        while True:
            r = httpx.post(f"{stack}/v1/images", json=body, headers=auth_headers, timeout=60)
            if r.json()["images"][0]["safety"]["action"] == "withhold":
                break
            assert time.monotonic() < deadline, "the new thresholds never applied"
            time.sleep(0.3)
        out = r.json()
        image = out["images"][0]
        assert image["b64_json"] is None and image["safety"]["category"] == "sexual"
        assert out["cost_units"] == 0 and out["price"] is None
        case = httpx.get(f"{stack}/v1/review/{image['safety']['review_id']}",
                         headers=auth_headers, timeout=10).json()
        assert (case["kind"], case["request_id"], case["classifier"]) == (
            "image", out["id"], "nudenet-320n")
        png = httpx.get(f"{stack}/v1/review/{case['id']}/images/0", headers=auth_headers,
                        timeout=10)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"

        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="a lighthouse at dusk", model="draft")
        assert e.value.code == "image_blocked"

        with keyed_channel(f"127.0.0.1:{stack_settings['grpc_port']}", api_key) as ch:
            g = pb_grpc.ImagesStub(ch).Generate(pb.GenerateRequest(prompt="a lighthouse"),
                                                timeout=60)
        assert g.images[0].data == b"" and g.images[0].safety.action == "withhold"
        assert g.images[0].safety.review_id and g.cost_units == 0
    finally:
        path.write_text(good)
    deadline = time.monotonic() + 15
    while httpx.post(f"{stack}/v1/images", json=body, headers=auth_headers,
                     timeout=60).json()["images"][0]["safety"]["action"] != "allow":
        assert time.monotonic() < deadline
        time.sleep(0.3)

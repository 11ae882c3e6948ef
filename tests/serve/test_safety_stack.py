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
        path.write_text(good.replace("version: 1", "version: 2").replace(
            "  sexual_minors:", "  toys:\n    reason: toys\n    terms: [teddy bear]\n"
            "  sexual_minors:", 1))
        eventually("a t3ddy bear", 403)
        path.write_text("version: 3\ncategories: [not, a, map]\n")  # refused: v2 stays
        time.sleep(1.5)
        assert status("a teddy bear") == 403 and status("a red fox") == 200
    finally:
        path.write_text(good)
    eventually("a teddy bear", 200)

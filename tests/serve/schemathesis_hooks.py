"""schemathesis checks, loaded through SCHEMATHESIS_HOOKS by test_fuzz_openapi.py:
every 4xx/5xx answers in its route's one error envelope with a stable code, and no
5xx but the contract's: the session stack routes a `broken` tier on purpose, which
answers 503 model_unavailable with Retry-After."""

import schemathesis

OPENAI_ROUTE = "/v1/images/generations"
# the types OpenAI's API answers with (its client picks the exception by status)
OPENAI_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                "not_found_error", "rate_limit_error", "server_error"}


@schemathesis.check
def one_envelope(ctx, response, case) -> None:
    if response.status_code < 400:
        return
    err = response.json()["error"]
    assert isinstance(err.get("code"), str) and err["code"], f"no stable code in {err}"
    assert isinstance(err.get("message"), str), f"no message in {err}"
    if case.path == OPENAI_ROUTE:
        assert err.get("type") in OPENAI_TYPES, f"not OpenAI's shape: {err}"
        assert response.status_code != 422, "OpenAI answers 400 for bad input"


@schemathesis.check
def no_server_error(ctx, response, case) -> None:
    if response.status_code < 500:
        return
    body = case.body if isinstance(case.body, dict) else {}
    assert response.status_code == 503 and body.get("tier") == "broken", (
        f"{response.status_code} {response.text[:300]}")
    assert response.json()["error"]["code"] == "model_unavailable"
    assert response.headers.get("retry-after") == ["5"]  # lists: the wire form

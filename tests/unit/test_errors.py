"""The error tree and its one status table."""

from __future__ import annotations

import pickle

import pytest

from serve import errors
from serve.errors import STATUS, ImagegenError, grpc_status, http_status


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


# Only classes the project defines: tests below create throwaway subclasses
# (standing in for Ray's re-raised errors) that must not need a row.
TREE = [c for c in _subclasses(ImagegenError) if c.__module__.startswith("serve.")]

CLIENT = {
    "invalid_request", "malformed_body", "unsupported_media_type", "unknown_tier",
    "limit_exceeded", "not_found", "method_not_allowed", "payload_too_large", "forbidden",
    "unauthenticated", "plan_limit", "commercial_use_forbidden", "quota_exceeded",
    "rate_limited", "idempotency_key_reused", "idempotency_in_progress", "prompt_blocked",
    "unknown_template", "invalid_variable", "template_retired", "template_not_approved",
    "image_blocked",
}
SERVER = {
    "internal", "model_unavailable", "overloaded", "generation_failed", "config_error",
    "model_verification_failed", "tier_disabled", "model_timeout", "state_unavailable",
    "image_safety_unavailable", "storage_unavailable", "draining",
}
# The error types OpenAI's API answers with (its client maps the status to the
# exception class: 400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError,
# 404 NotFoundError, 429 RateLimitError, 5xx InternalServerError).
OPENAI_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                "not_found_error", "rate_limit_error", "server_error"}
GRPC_CODES = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
}


def test_tree_is_the_whole_error_module():
    # Guards the walk itself: every ImagegenError in serve.errors is found.
    defined = {
        v for v in vars(errors).values()
        if isinstance(v, type) and issubclass(v, ImagegenError) and v is not ImagegenError
    }
    assert defined <= set(TREE)
    assert len(TREE) >= 13


@pytest.mark.parametrize("cls", TREE, ids=lambda c: c.__name__)
def test_every_subclass_has_a_status_row(cls):
    assert cls in STATUS, f"{cls.__name__} has no row in STATUS"


@pytest.mark.parametrize("cls", [ImagegenError, *TREE], ids=lambda c: c.__name__)
def test_status_class_matches_code(cls):
    status, grpc, openai, openai_type = STATUS[cls]
    assert grpc in GRPC_CODES
    assert openai_type in OPENAI_TYPES
    if cls.code in CLIENT:
        assert 400 <= status < 500, (cls.__name__, status)
        assert 400 <= openai < 500 and openai != 422, (cls.__name__, openai)
    else:
        assert cls.code in SERVER, f"classify {cls.code!r} as client or server"
        assert 500 <= status < 600, (cls.__name__, status)
        assert openai == status and openai_type == "server_error", cls.__name__


def test_every_listed_code_is_used():
    assert {c.code for c in [ImagegenError, *TREE]} == CLIENT | SERVER


def test_codes_are_unique():
    codes = [c.code for c in [ImagegenError, *TREE]]
    assert len(codes) == len(set(codes))


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        (None, {"error": {"code": "limit_exceeded", "message": "too big"}}),
        ([{"field": "n"}], {"error": {"code": "limit_exceeded", "message": "too big",
                                      "details": [{"field": "n"}]}}),
        # falsy but present: still sent
        ([], {"error": {"code": "limit_exceeded", "message": "too big", "details": []}}),
    ],
)
def test_envelope_shape(details, expected):
    assert errors.LimitExceeded("too big", details=details).envelope() == expected


@pytest.mark.parametrize("cls", [ImagegenError, *TREE], ids=lambda c: c.__name__)
def test_envelope_carries_class_code(cls):
    body = cls("boom").envelope()
    assert body == {"error": {"code": cls.code, "message": "boom"}}


@pytest.mark.parametrize("cls", [ImagegenError, *TREE], ids=lambda c: c.__name__)
def test_status_functions_read_the_table(cls):
    err = cls("x")
    assert (http_status(err), grpc_status(err)) == STATUS[cls][:2]


class _RayTaskError(Exception):
    """Stands in for ray.exceptions.RayTaskError (not imported: no Ray in unit tests)."""


@pytest.mark.parametrize(
    "base",
    [errors.LimitExceeded, errors.Overloaded, errors.UnknownTier, errors.GenerationFailed],
    ids=lambda c: c.__name__,
)
def test_dynamic_subclass_resolves_to_its_base_row(base):
    # Ray re-raises a remote error as type(f"RayTaskError({name})", (RayTaskError, cls), {}).
    dyn = type(f"RayTaskError({base.__name__})", (_RayTaskError, base), {})
    err = dyn("remote")
    assert dyn not in STATUS
    assert (http_status(err), grpc_status(err)) == STATUS[base][:2]
    assert err.envelope()["error"]["code"] == base.code


def test_a_subclass_row_is_not_its_parents():
    # Exact class first: ModelTimeout must not fall back to ModelUnavailable's row.
    assert grpc_status(errors.ModelTimeout("x")) == "DEADLINE_EXCEEDED"
    assert grpc_status(errors.ModelUnavailable("x")) == "UNAVAILABLE"


def test_overload_is_retryable_and_a_spent_budget_is_resource_exhausted():
    # gRPC clients retry UNAVAILABLE by policy; RESOURCE_EXHAUSTED means "your quota".
    assert grpc_status(errors.Overloaded("x")) == "UNAVAILABLE"
    assert grpc_status(errors.QuotaExceeded("x", retry_after_s=3)) == "RESOURCE_EXHAUSTED"
    assert http_status(errors.QuotaExceeded("x", retry_after_s=3)) == 429


@pytest.mark.parametrize("cls", [ImagegenError, *TREE], ids=lambda c: c.__name__)
def test_pickle_round_trip(cls):
    err = cls("message with ünïcode", details={"field": "size"})
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert back.message == str(back) == "message with ünïcode"
    assert back.details == {"field": "size"}
    assert back.envelope() == err.envelope()

"""The error tree and the ONE table that maps it to HTTP and gRPC statuses.

Every failure a client can see is an `ImagegenError` subclass with a stable `code`.
Transports never choose statuses themselves: they look the class up in STATUS.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import ValidationError


class ImagegenError(Exception):
    """Base of every error a client may see. `code` is stable API."""

    code = "internal"
    retry_after_s: int | None = None  # sent as Retry-After: worth retrying later

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def envelope(self) -> dict[str, Any]:
        """The one error body every transport sends."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class InvalidRequest(ImagegenError):
    """The body failed validation (fields, types, ranges)."""

    code = "invalid_request"


class MalformedBody(ImagegenError):
    """The body is not parseable JSON."""

    code = "malformed_body"


class UnsupportedMediaType(ImagegenError):
    code = "unsupported_media_type"


class UnknownTier(ImagegenError):
    code = "unknown_tier"


class UnknownTemplate(ImagegenError):
    code = "unknown_template"


class InvalidVariable(ImagegenError):
    """A template variable is unknown, missing, mistyped, out of range or unsafe."""

    code = "invalid_variable"


class TemplateRetired(ImagegenError):
    """The template version is past its deprecation date; `successor` replaces it."""

    code = "template_retired"

    def __init__(self, message: str, *, successor: str | None = None, details=None) -> None:
        super().__init__(message, details=details)
        self.successor = successor


class LimitExceeded(ImagegenError):
    """A value is valid in general but outside the routed revision's limits."""

    code = "limit_exceeded"


class Unauthenticated(ImagegenError):
    """No API key, a malformed Authorization header, or a key that is unknown or revoked."""

    code = "unauthenticated"


class Forbidden(ImagegenError):
    """The caller may not do this (pin a revision, now; roles and plans next)."""

    code = "forbidden"


class PlanLimit(Forbidden):
    """The caller's plan does not allow this request (tier, n, size, raw prompt)."""

    code = "plan_limit"


class CommercialUseForbidden(Forbidden):
    """A commercial plan asked for a tier (or pinned a revision) whose every usable
    revision's licence forbids or restricts commercial use."""

    code = "commercial_use_forbidden"


class IdempotencyKeyReused(ImagegenError):
    """The Idempotency-Key was used before with another request body."""

    code = "idempotency_key_reused"


class IdempotencyInProgress(ImagegenError):
    """A request with this Idempotency-Key is still running; retry when it is done."""

    code = "idempotency_in_progress"
    retry_after_s = 1


class TemplateNotApproved(Forbidden):
    """Only approved template versions serve (a plan with template_drafts excepted)."""

    code = "template_not_approved"


class PromptBlocked(Forbidden):
    """The prompt policy blocked a prompt, negative prompt or template variable. The
    answer names the category and reason, never the matched term."""

    code = "prompt_blocked"

    def __init__(self, message: str, *, category: str = "", reason: str = "", details=None) -> None:
        super().__init__(message, details=details)
        self.category = category
        self.reason = reason


class ImageBlocked(Forbidden):
    """Every image of the request was withheld by image safety (the OpenAI route,
    whose images carry no verdict; the native API answers each image's verdict)."""

    code = "image_blocked"


class NotFound(ImagegenError):
    code = "not_found"


class MethodNotAllowed(ImagegenError):
    code = "method_not_allowed"


class PayloadTooLarge(ImagegenError):
    code = "payload_too_large"


class ModelUnavailable(ImagegenError):
    """No revision of the tier can serve now (unhealthy, failed to load, unanswered)."""

    code = "model_unavailable"
    retry_after_s = 5


class ModelTimeout(ModelUnavailable):
    """A model call went unanswered for the routing document's breaker.timeout_s
    (cancelled; the request moves to the next revision)."""

    code = "model_timeout"


class Overloaded(ModelUnavailable):
    """The model's queue is full; retry later (Retry-After)."""

    code = "overloaded"
    retry_after_s = 1


class Draining(ImagegenError):
    """This ingress replica is stopping (a rolling update, a scale-down, a node
    drain): it finishes the requests it holds and takes no new one. Another replica
    answers the retry."""

    code = "draining"
    retry_after_s = 1


class TierDisabled(ImagegenError):
    """An operator disabled the tier in the routing document (the message says why)."""

    code = "tier_disabled"
    retry_after_s = 60


class QuotaExceeded(ImagegenError):
    """The principal's budget (token bucket or daily cap) cannot pay for this request
    now; `retry_after_s` says when it can. `ratelimit`: what the RateLimit headers say."""

    code = "quota_exceeded"

    def __init__(self, message: str, *, retry_after_s: int = 1, ratelimit: dict | None = None,
                 details=None) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s
        self.ratelimit = ratelimit or {}


class RateLimited(ImagegenError):
    """The principal already has its share of this ingress replica's queue in flight."""

    code = "rate_limited"
    retry_after_s = 1


class StateUnavailable(ImagegenError):
    """The state store (SQLite file, Redis) cannot be reached: fail closed, retry later."""

    code = "state_unavailable"
    retry_after_s = 5


class StorageUnavailable(ImagegenError):
    """The object store (directory, S3) cannot be reached or written: nothing is
    charged; retry later."""

    code = "storage_unavailable"
    retry_after_s = 5


class ImageSafetyUnavailable(ImagegenError):
    """The image classifier cannot run: images are not delivered unchecked (fail
    closed; `image_safety_fail_open` changes that). Nothing is charged."""

    code = "image_safety_unavailable"
    retry_after_s = 5


class GenerationFailed(ImagegenError):
    """The pipeline raised while generating; nothing about the request was wrong."""

    code = "generation_failed"


class ConfigError(ImagegenError):
    """Invalid models.lock, routing or settings. Raised at start, never per request."""

    code = "config_error"


class ModelVerificationError(ConfigError):
    """A model's files do not match models.lock."""

    code = "model_verification_failed"


class Row(NamedTuple):
    http: int  # the native API's status
    grpc: str  # a grpc.StatusCode name
    openai: int  # /v1/images/generations: the status OpenAI's API gives (its client picks
    openai_type: str  # the exception type from the status alone) and its error type


_BAD = (400, "invalid_request_error")  # OpenAI answers 400 where the native API says 422
_DOWN = (503, "server_error")
_FAILED = (500, "server_error")

# Looked up by exact class; a test proves every subclass of ImagegenError has a row.
STATUS: dict[type[ImagegenError], Row] = {
    ImagegenError: Row(500, "INTERNAL", *_FAILED),
    InvalidRequest: Row(422, "INVALID_ARGUMENT", *_BAD),
    MalformedBody: Row(400, "INVALID_ARGUMENT", *_BAD),
    UnsupportedMediaType: Row(415, "INVALID_ARGUMENT", *_BAD),
    UnknownTier: Row(422, "INVALID_ARGUMENT", *_BAD),
    LimitExceeded: Row(422, "OUT_OF_RANGE", *_BAD),
    UnknownTemplate: Row(422, "INVALID_ARGUMENT", *_BAD),
    InvalidVariable: Row(422, "INVALID_ARGUMENT", *_BAD),
    TemplateRetired: Row(410, "FAILED_PRECONDITION", *_BAD),
    TemplateNotApproved: Row(403, "PERMISSION_DENIED", 403, "permission_error"),
    Unauthenticated: Row(401, "UNAUTHENTICATED", 401, "authentication_error"),
    Forbidden: Row(403, "PERMISSION_DENIED", 403, "permission_error"),
    PlanLimit: Row(403, "PERMISSION_DENIED", 403, "permission_error"),
    CommercialUseForbidden: Row(403, "PERMISSION_DENIED", 403, "permission_error"),
    IdempotencyKeyReused: Row(422, "INVALID_ARGUMENT", *_BAD),
    IdempotencyInProgress: Row(409, "ABORTED", 409, "invalid_request_error"),
    # OpenAI answers a moderation block 400 (the client's BadRequestError)
    PromptBlocked: Row(403, "PERMISSION_DENIED", 400, "invalid_request_error"),
    ImageBlocked: Row(403, "PERMISSION_DENIED", 400, "invalid_request_error"),
    NotFound: Row(404, "NOT_FOUND", 404, "not_found_error"),
    MethodNotAllowed: Row(405, "UNIMPLEMENTED", 405, "invalid_request_error"),
    PayloadTooLarge: Row(413, "INVALID_ARGUMENT", *_BAD),
    ModelUnavailable: Row(503, "UNAVAILABLE", *_DOWN),
    ModelTimeout: Row(503, "DEADLINE_EXCEEDED", *_DOWN),
    # The caller's budget is RESOURCE_EXHAUSTED; an overloaded revision is the
    # retryable UNAVAILABLE (gRPC clients retry UNAVAILABLE by policy, not the other).
    Overloaded: Row(503, "UNAVAILABLE", *_DOWN),
    QuotaExceeded: Row(429, "RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    RateLimited: Row(429, "RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    TierDisabled: Row(503, "UNAVAILABLE", *_DOWN),
    Draining: Row(503, "UNAVAILABLE", *_DOWN),
    StateUnavailable: Row(503, "UNAVAILABLE", *_DOWN),
    StorageUnavailable: Row(503, "UNAVAILABLE", *_DOWN),
    ImageSafetyUnavailable: Row(503, "UNAVAILABLE", *_DOWN),
    GenerationFailed: Row(500, "INTERNAL", *_FAILED),
    ConfigError: Row(500, "FAILED_PRECONDITION", *_FAILED),
    ModelVerificationError: Row(500, "FAILED_PRECONDITION", *_FAILED),
}


def row(err: ImagegenError) -> Row:
    # Walk the MRO: Ray re-raises a remote error as a dynamic subclass of it.
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return STATUS[ImagegenError]


def http_status(err: ImagegenError) -> int:
    return row(err).http


def grpc_status(err: ImagegenError) -> str:
    return row(err).grpc


def describe(e: ValidationError) -> str:
    """One line naming each bad field and quoting the bad value."""
    return "; ".join(
        f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']} (got {err.get('input')!r})"
        for err in e.errors()
    )

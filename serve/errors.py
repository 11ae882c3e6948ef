"""The error tree and the ONE table that maps it to HTTP and gRPC statuses.

Every failure a client can see is an `ImagegenError` subclass with a stable `code`.
Transports never choose statuses themselves: they look the class up in STATUS.
"""

from __future__ import annotations

from typing import Any

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


class LimitExceeded(ImagegenError):
    """A value is valid in general but outside the routed revision's limits."""

    code = "limit_exceeded"


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


class Overloaded(ModelUnavailable):
    """The model's queue is full; retry later (Retry-After)."""

    code = "overloaded"
    retry_after_s = 1


class TierDisabled(ImagegenError):
    """An operator disabled the tier in the routing document (the message says why)."""

    code = "tier_disabled"
    retry_after_s = 60


class GenerationFailed(ImagegenError):
    """The pipeline raised while generating; nothing about the request was wrong."""

    code = "generation_failed"


class ConfigError(ImagegenError):
    """Invalid models.lock, routing or settings. Raised at start, never per request."""

    code = "config_error"


class ModelVerificationError(ConfigError):
    """A model's files do not match models.lock."""

    code = "model_verification_failed"


# (HTTP status, gRPC status code name). Looked up by exact class; a test proves
# every subclass of ImagegenError has a row.
STATUS: dict[type[ImagegenError], tuple[int, str]] = {
    ImagegenError: (500, "INTERNAL"),
    InvalidRequest: (422, "INVALID_ARGUMENT"),
    MalformedBody: (400, "INVALID_ARGUMENT"),
    UnsupportedMediaType: (415, "INVALID_ARGUMENT"),
    UnknownTier: (422, "INVALID_ARGUMENT"),
    LimitExceeded: (422, "OUT_OF_RANGE"),
    NotFound: (404, "NOT_FOUND"),
    MethodNotAllowed: (405, "UNIMPLEMENTED"),
    PayloadTooLarge: (413, "INVALID_ARGUMENT"),
    ModelUnavailable: (503, "UNAVAILABLE"),
    Overloaded: (503, "RESOURCE_EXHAUSTED"),
    TierDisabled: (503, "UNAVAILABLE"),
    GenerationFailed: (500, "INTERNAL"),
    ConfigError: (500, "FAILED_PRECONDITION"),
    ModelVerificationError: (500, "FAILED_PRECONDITION"),
}


def _row(err: ImagegenError) -> tuple[int, str]:
    # Walk the MRO: Ray re-raises a remote error as a dynamic subclass of it.
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return STATUS[ImagegenError]


def http_status(err: ImagegenError) -> int:
    return _row(err)[0]


def grpc_status(err: ImagegenError) -> str:
    return _row(err)[1]


def describe(e: ValidationError) -> str:
    """One line naming each bad field and quoting the bad value."""
    return "; ".join(
        f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']} (got {err.get('input')!r})"
        for err in e.errors()
    )

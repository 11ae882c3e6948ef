"""Wire types shared by every transport, and the one strict parser of a request.

Strict: no bool-to-number, float-to-int or string-to-number coercion; sizes in
ASCII digits; duplicate JSON keys, NaN and Infinity refused; in text, newline,
carriage return and tab are the only control characters allowed. Bounds that hold
for every model live in the types (and so in the OpenAPI document); per-model
limits are in GET /v1/models.
"""

from __future__ import annotations

import datetime as dt
import json
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import InvalidRequest, MalformedBody
from .lockfile import Defaults, Limits
from .templates.library import Template

MAX_SEED = 2**32 - 1
TEMPLATE_REF = r"[a-z0-9][a-z0-9-]{0,63}(@[1-9][0-9]{0,8})?"  # "id" or "id@version"
_ALLOWED_CONTROLS = frozenset("\n\r\t")


def _printable(v: str) -> str:
    for ch in v:
        # Cc: control characters (NUL included); Cs: lone surrogates (JSON "\ud800").
        if unicodedata.category(ch) in ("Cc", "Cs") and ch not in _ALLOWED_CONTROLS:
            raise ValueError(f"contains the control character U+{ord(ch):04X}")
    return v


PRINTABLE = AfterValidator(_printable)  # after the length constraints: their error types stay


class GenerateRequest(BaseModel):
    """POST /v1/images. Size, steps and guidance default per model (GET /v1/models)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    prompt: Annotated[str, Field(min_length=1, max_length=2000), PRINTABLE] | None = Field(
        None, description="what to draw (newline and tab allowed, no other control "
        "characters); with a template, it fills the template's free-text variable. Give a "
        "prompt, a template, or both"
    )
    template: Annotated[str, Field(pattern=f"^{TEMPLATE_REF}$")] | None = Field(
        None, description='a style library template, "id" (its newest approved version) or '
        '"id@version" (GET /v1/templates)'
    )
    variables: Annotated[dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")],
                              Annotated[str, Field(max_length=500), PRINTABLE] | int | float],
                         Field(max_length=32)] | None = Field(
        None, description="the template's variables: strings, numbers (enum values are strings)"
    )
    negative_prompt: Annotated[str, Field(max_length=2000), PRINTABLE] = Field(
        "", description="what to steer away from"
    )
    tier: Annotated[str, Field(min_length=1, max_length=32)] = Field(
        "draft", description="routing tier: draft (small, fast) or final (frontier)"
    )
    model: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="pin one models.lock revision by name (GET /v1/models): it alone "
        "serves, no fallback; priced at least as the dearest tier it serves. Only where "
        "pinning is allowed (403 else)"
    )
    n: Annotated[int, Field(ge=1, le=8)] = Field(1, description="number of images")
    size: Annotated[str, Field(pattern=r"^[0-9]{1,5}x[0-9]{1,5}$")] | None = Field(
        None, description='"WIDTHxHEIGHT" in ASCII digits, multiples of 8, within the '
        "model's limits (GET /v1/models)"
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="seed of the first image; image i uses seed+i. Drawn when absent"
    )
    steps: Annotated[int, Field(ge=1, le=500)] | None = Field(
        None, description="denoising steps"
    )
    guidance: Annotated[float, Field(ge=0, le=50)] | None = Field(
        None, description="classifier-free guidance scale"
    )
    quality: Literal["low", "standard", "high"] | None = Field(
        None, description="scales the model's default steps: low 0.5x, standard 1x, high 2x "
        "(at most the model's max_steps); give steps or quality, not both"
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="how images come back: base64 in the answer, or a URL (a "
        "presigned object-store GET, the CDN, or this service's signed /v1/files/...)"
    )
    output_format: Literal["png", "webp", "avif", "jpeg"] = Field(
        "png", description="the encoding (provenance XMP, no other metadata)"
    )
    output_quality: Annotated[int, Field(ge=1, le=100)] | None = Field(
        None, description="lossy quality 1..100 (webp 80, avif 60, jpeg 85 by default; "
        "ignored for png)"
    )
    aspect_ratios: Annotated[list[Annotated[str, Field(pattern=r"^[0-9]{1,2}:[0-9]{1,2}$")]],
                             Field(min_length=1, max_length=4)] | None = Field(
        None, description='several aspect ratios at once ("16:9", ...), n images each at '
        "the same seeds, sized to `megapixels` on the model's grid; not with size"
    )
    megapixels: Annotated[float, Field(gt=0, le=16)] | None = Field(
        None, description="the target area for aspect_ratios (default: the model's "
        "default size)"
    )
    approval_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,128}$")] | None = Field(
        None, description="your approval reference, kept in each image's sidecar for audit"
    )
    moderation: Literal["auto", "low"] | None = Field(
        None, description="image safety: auto (the plan's thresholds) or low (the policy's "
        "more permissive ones, where the plan's safety profile allows them); the always-on "
        "category is never loosened"
    )

    @model_validator(mode="after")
    def _steps_or_quality(self) -> GenerateRequest:
        if self.steps is not None and self.quality is not None:
            raise ValueError("give steps or quality, not both")
        if self.prompt is None and self.template is None:
            raise PydanticCustomError("missing_prompt", "give a prompt or a template")
        if self.variables is not None and self.template is None:
            raise ValueError("variables need a template")
        if self.aspect_ratios is not None and self.size is not None:
            raise ValueError("give size or aspect_ratios, not both")
        if self.megapixels is not None and self.aspect_ratios is None:
            raise ValueError("megapixels sizes aspect_ratios: give them too")
        return self

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("prompt is blank")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is None:
            return v
        w, _, h = v.partition("x")  # the pattern made both ASCII digits
        if int(w) % 8 or int(h) % 8:
            raise ValueError(f"size {v!r}: width and height must be multiples of 8")
        return v

    def dimensions(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        w, _, h = self.size.partition("x")
        return int(w), int(h)


class AltText(BaseModel):
    text: str
    source: Literal["template", "captioner"] = Field(
        description="where the draft came from: the template's pattern or the captioner")
    needs_review: bool = Field(True, description="drafted, not checked by a person")


class ImageSafety(BaseModel):
    action: Literal["allow", "review", "blur", "withhold", "unchecked"] = Field(
        description="allow; review: delivered and queued for a person; blur: delivered "
        "blurred; withhold: not delivered (b64_json null, not charged); unchecked: no "
        "classifier ran (configured off, or failing with image_safety_fail_open)")
    category: str | None = Field(None, description="the category that decided it")
    review_id: str | None = Field(None, description="its case in the review queue (appeal "
                                  "with the request id)")


class Image(BaseModel):
    id: str | None = Field(None, description="the image's id (GET /v1/images/{id}, reroll); "
                           "none where nothing is stored")
    seed: int = Field(description="reproduces this image with the same request")
    width: int
    height: int
    aspect_ratio: str | None = Field(None, description="the ratio asked for (aspect_ratios)")
    mime_type: Literal["image/png", "image/webp", "image/avif", "image/jpeg"] = "image/png"
    b64_json: str | None = Field(None, description="the encoded image, base64 (b64_json); "
                                 "null when withheld or asked as a URL")
    url: str | None = Field(None, description="where to GET it (response_format url)")
    safety: ImageSafety = Field(
        default_factory=lambda: ImageSafety(action="unchecked"),
        description="the image classifier's verdict (answers kept before image safety, "
        "replayed: unchecked)")
    alt_text: AltText | None = Field(None, description="a drafted alt text (from the "
                                     "template's pattern)")


class Deprecation(BaseModel):
    successor: str = Field(description="the template id@version to move to")
    sunset: dt.date = Field(description="from this day (UTC) the version is refused")


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting in the model replica for a batch slot")
    generate_ms: float = Field(description="the pipeline call that made these images")
    total_ms: float = Field(description="inside the service, from parse to response")


class GenerateResponse(BaseModel):
    id: str = Field(description="request id (also the X-Request-Id header)")
    trace_id: str = Field(description="OpenTelemetry trace id (also the X-Trace-Id header)")
    created: int = Field(description="unix seconds")
    tier: str
    model: str = Field(description="models.lock name of the revision that served it")
    revision: str = Field(description="immutable revision from models.lock")
    fallback: bool = Field(False, description="served by a fallback, not the tier's primary")
    pinned: bool = Field(False, description="the request pinned this revision: no fallback "
                         "applied")
    batch_images: int = Field(description="images in the pipeline call that ran this request")
    cost_units: float = Field(description="charged: cost weight x megapixels x steps over "
                              "the model's default (a fallback never costs more than the "
                              "tier)")
    price: float | None = Field(None, description="what the caller's plan charged: the cost "
                                "units at the month's progressive price (none without a plan)")
    template: str | None = Field(None, description="the template id@version that rendered it")
    template_deprecation: Deprecation | None = Field(
        None, description="the template version is deprecated (HTTP also sends the Sunset "
        "header and a successor-version Link)")
    replayed: bool = Field(False, description="the answer of an earlier request with the same "
                           "Idempotency-Key and body, not charged again")
    cached: bool = Field(False, description="answered from the store: the same request (seed "
                         "included) was made before; no model ran; the plan's cache price")
    images: list[Image]
    timings: Timings


class ModelInfo(BaseModel):
    name: str
    revision: str
    deployment: str
    pipeline: str
    dtype: str
    license: str
    commercial_use: str
    tiers: list[str] = Field(description="tiers routed to this model now")
    defaults: Defaults
    limits: Limits


class ModelList(BaseModel):
    models: list[ModelInfo]


class TemplateList(BaseModel):
    templates: list[Template] = Field(description="every template version")


class ReviewDecisionRequest(BaseModel):
    """POST /v1/review/{id}/decision."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    decision: Literal["approved", "rejected"]
    reason: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = Field(
        description="a reason code (counted: false_positive_allowlist, true_positive, ...)")


class AppealRequest(BaseModel):
    """POST /v1/appeals: the blocked caller asks for a review."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    request_id: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="the blocked request's id (its X-Request-Id)")
    message: Annotated[str, Field(min_length=1, max_length=2000), PRINTABLE]


class QuotaStatus(BaseModel):
    """A principal's budget now (GET /v1/quota), in cost units."""

    principal: str
    plan: str
    bucket_units: float = Field(description="in the token bucket now")
    burst: float = Field(description="the bucket's size")
    refill_per_s: float
    credits: float = Field(description="support credits, spent once the bucket is short")
    today_units: float = Field(description="spent this UTC day")
    daily_units: float | None = Field(description="the UTC day's cap (none: no cap)")
    month_units: float = Field(description="charged this UTC month (prices its band)")
    held: int = Field(description="reservations of requests in flight")


class ErrorBody(BaseModel):
    code: str
    message: str
    details: object | None = None
    trace_id: str | None = Field(None, description="OpenTelemetry trace id of the request")


class ErrorEnvelope(BaseModel):
    error: ErrorBody


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def load_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN or Infinity; MalformedBody
    naming the problem (deep nesting and 5,000-digit numbers included)."""
    try:
        # Decode first: json.loads(bytes) would also take UTF-16 and UTF-32.
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise MalformedBody(f"body is not valid JSON: {why}") from None


def parse_request(raw: bytes | dict) -> GenerateRequest:
    """Validate a request body; MalformedBody for bad JSON, InvalidRequest with
    one entry per bad field otherwise."""
    data = raw if isinstance(raw, dict) else load_json(raw)
    return validate(GenerateRequest, data)


def validate(model: type[BaseModel], data: Any) -> Any:
    """`model` from parsed JSON; InvalidRequest listing every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        fields = [
            {"field": ".".join(map(str, err["loc"])) or "body", "type": err["type"],
             "message": err["msg"]}
            if err["type"] != "missing_prompt"  # the model's check: read as the field's
            else {"field": "prompt", "type": "missing", "message": err["msg"]}
            for err in errors
        ]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        raise InvalidRequest(f"invalid request: {summary}", details=fields) from None

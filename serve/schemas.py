"""Wire types shared by every transport (HTTP today; gRPC and OpenAI shapes later)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequest, MalformedBody
from .lockfile import Defaults, Limits

MAX_SEED = 2**32 - 1


class GenerateRequest(BaseModel):
    """POST /v1/images. Size, steps and guidance default per model (GET /v1/models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, Field(min_length=1, max_length=2000)] = Field(
        description="what to draw"
    )
    negative_prompt: Annotated[str, Field(max_length=2000)] = Field(
        "", description="what to steer away from"
    )
    tier: Annotated[str, Field(min_length=1, max_length=32)] = Field(
        "draft", description="routing tier: draft (small, fast) or final (frontier)"
    )
    n: Annotated[int, Field(ge=1, le=8)] = Field(1, description="number of images")
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT", multiples of 8 within the model limits'
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
    response_format: Literal["b64_json"] = Field(
        "b64_json", description="how images come back (URLs arrive with object storage)"
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is blank")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is None:
            return v
        w, sep, h = v.partition("x")
        if not (sep and w.isdigit() and h.isdigit() and len(w) <= 5 and len(h) <= 5):
            raise ValueError(f'size {v!r} is not "WIDTHxHEIGHT"')
        if int(w) % 8 or int(h) % 8:
            raise ValueError(f"size {v!r}: width and height must be multiples of 8")
        return v

    def dimensions(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        w, _, h = self.size.partition("x")
        return int(w), int(h)


class Image(BaseModel):
    seed: int = Field(description="reproduces this image with the same request")
    width: int
    height: int
    mime_type: Literal["image/png"] = "image/png"
    b64_json: str = Field(description="the encoded image, base64")


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
    batch_images: int = Field(description="images in the pipeline call that ran this request")
    cost_units: float = Field(description="charged: cost weight x images x megapixels (a "
                              "fallback never costs more than the tier)")
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


class ErrorBody(BaseModel):
    code: str
    message: str
    details: object | None = None
    trace_id: str | None = Field(None, description="OpenTelemetry trace id of the request")


class ErrorEnvelope(BaseModel):
    error: ErrorBody


def parse_request(raw: bytes | dict) -> GenerateRequest:
    """Validate a request body; MalformedBody for bad JSON, InvalidRequest with
    one entry per bad field otherwise."""
    try:
        if isinstance(raw, dict):
            return GenerateRequest.model_validate(raw)
        return GenerateRequest.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise MalformedBody(f"body is not valid JSON: {errors[0]['msg']}") from None
        fields = [
            {"field": ".".join(map(str, err["loc"])) or "body", "type": err["type"],
             "message": err["msg"]}
            for err in errors
        ]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        raise InvalidRequest(f"invalid request: {summary}", details=fields) from None

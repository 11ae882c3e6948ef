"""OpenAI-compatible `POST /v1/images/generations`: a thin adapter over ImageService.

It translates OpenAI's request fields to a GenerateRequest and the answer to
OpenAI's response shape, so the official `openai` client works with `base_url`.
Every field is honoured or refused with a 400 naming it, never ignored (but
output_compression with png, which OpenAI ignores too); errors come back in
OpenAI's shape with OpenAI's statuses (its client picks the exception type from
the status alone).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ImageBlocked, ImagegenError, InvalidRequest, row
from ..schemas import PRINTABLE, GenerateRequest, GenerateResponse, load_json, validate
from ..service import ImageService
from ..telemetry import annotate, current_trace_id, stage
from .http import (
    absolute,
    error_headers,
    id_header,
    idempotency_key,
    peer,
    read_json_body,
    request_id,
)

ROUTE = "/v1/images/generations"
# `model` -> tier. A tier's own name works too. OpenAI's model names map to the
# tier nearest in spirit, so tools that hard-code one work unchanged.
MODEL_ALIASES = {"dall-e-2": "draft", "gpt-image-1-mini": "draft",
                 "dall-e-3": "final", "gpt-image-1": "final", "gpt-image-1.5": "final"}
# OpenAI's quality vocabulary onto imagegen's (GenerateRequest.quality).
QUALITY = {"low": "low", "medium": "standard", "standard": "standard", "auto": "standard",
           "high": "high", "hd": "high"}
# The quality word the answer reports, in OpenAI's vocabulary.
QUALITY_NAME = {"low": "low", "medium": "medium", "standard": "medium", "auto": "medium",
                "high": "high", "hd": "high"}
# OpenAI fields imagegen honours only in part (or not yet): the values it can honour,
# and why the others are refused. A later feature widens its entry.
_PARTLY = {
    "background": ({"auto", "opaque"}, "images are opaque"),
    "style": (set(), "vivid/natural styles are not offered; templates will carry styles"),
    "partial_images": (set(), "streaming partial images is not offered"),
    "stream": ({False}, "streaming is not offered"),
}


# Native field names an error may name, as this route's caller knows them.
_OPENAI_PARAM = {"tier": "model", "steps": "quality"}


class OpenAIImageRequest(BaseModel):
    """OpenAI's image generation fields, plus imagegen extensions (seed,
    negative_prompt, tier) as extra body fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[str, Field(min_length=1, max_length=2000), PRINTABLE]
    model: str | None = Field(None, description="a tier, an alias (MODEL_ALIASES), or a "
                              "models.lock name to pin that revision (where allowed)")
    n: Annotated[int, Field(ge=1, le=8)] = 1
    size: Annotated[str, Field(pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$")] | None = None
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "webp", "jpeg"] | None = None
    # OpenAI's 0..100 for webp/jpeg (100: the least loss), as output_quality (0 -> 1);
    # absent: imagegen's defaults (webp 80, jpeg 85), not OpenAI's 100. png ignores it.
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: Literal["low", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    partial_images: int | None = None
    stream: bool | None = None  # not Literal[False]: a literal matches 0 by equality
    user: Annotated[str, Field(max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    # imagegen extensions
    seed: int | None = None
    negative_prompt: str | None = None
    tier: str | None = None
    template: str | None = None  # `prompt` then fills its free-text variable
    variables: dict[str, Any] | None = None


def to_generate_request(o: OpenAIImageRequest,
                        models: frozenset[str] = frozenset()) -> GenerateRequest:
    """The native request for an OpenAI one; InvalidRequest naming a refused field.
    `model` naming one of `models` (models.lock) pins that revision."""
    for name, (honoured, why) in _PARTLY.items():
        value = getattr(o, name)
        if value is not None and value not in honoured:
            _refuse(name, f"{name} {value!r} is not supported: {why}")
    pin = o.model if o.model in models else None
    tier = None if pin else MODEL_ALIASES.get(o.model or "", o.model)
    if o.tier is not None and tier is not None and o.tier != tier:
        _refuse("tier", f"model {o.model!r} means tier {tier!r}, but tier {o.tier!r} was given")
    fields: dict[str, Any] = {
        "prompt": o.prompt, "n": o.n, "tier": o.tier or tier or "draft", "seed": o.seed,
        "model": pin, "template": o.template, "variables": o.variables,
        "moderation": o.moderation,
        "negative_prompt": o.negative_prompt, "quality": QUALITY.get(o.quality or ""),
        "size": None if o.size in (None, "auto") else o.size,
        "response_format": o.response_format, "output_format": o.output_format,
        "output_quality": None if o.output_compression is None or o.output_format in (
            None, "png") else max(1, o.output_compression),
    }
    return validate(GenerateRequest, {k: v for k, v in fields.items() if v is not None})


def _refuse(param: str, message: str) -> None:
    raise InvalidRequest(message, details=[{"field": param, "type": "unsupported",
                                            "message": message}])


def to_openai(resp: GenerateResponse, quality: str | None) -> dict[str, Any]:
    """OpenAI's answer: the delivered images only (its clients expect every entry to
    carry one, as b64_json or url); ImageBlocked (400) when image safety withheld
    them all."""
    shown = [i for i in resp.images if i.b64_json is not None or i.url is not None]
    if not shown:
        raise ImageBlocked(f"image safety withheld all {len(resp.images)} image(s) "
                           f"({resp.images[0].safety.category}); nothing was charged",
                           details=[{"field": "prompt", "type": "image_blocked"}])
    first = shown[0]
    return {
        "created": resp.created,
        "data": [{"b64_json": i.b64_json} if i.b64_json is not None else {"url": i.url}
                 for i in shown],
        "output_format": first.mime_type.removeprefix("image/"),  # the real one
        "background": "opaque", "size": f"{first.width}x{first.height}",
        **({"quality": quality} if quality else {}),
        # What OpenAI's shape has no place for; clients ignore unknown fields.
        "imagegen": {"id": resp.id, "trace_id": resp.trace_id, "tier": resp.tier,
                     "model": resp.model, "revision": resp.revision, "fallback": resp.fallback,
                     "pinned": resp.pinned, "cached": resp.cached,
                     "image_ids": [i.id for i in shown],
                     "seeds": [i.seed for i in shown], "cost_units": resp.cost_units,
                     "price": resp.price, "replayed": resp.replayed,
                     "template": resp.template,
                     "alt_text": [i.alt_text.text if i.alt_text else None for i in shown],
                     "safety": [i.safety.model_dump(exclude_none=True) for i in shown],
                     "withheld": len(resp.images) - len(shown),
                     "batch_images": resp.batch_images,
                     "timings": resp.timings.model_dump()},
    }


def error(request: Request, err: ImagegenError,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    headers = error_headers(request, err, headers)
    r = row(err)
    details = err.details if isinstance(err.details, list) else []
    param = details[0]["field"] if details else None
    body = {"error": {"message": err.message, "type": r.openai_type, "code": err.code,
                      "param": _OPENAI_PARAM.get(param, param),
                      "trace_id": current_trace_id()}}
    return JSONResponse(body, status_code=r.openai, headers=headers)


def add_routes(app: FastAPI, service: ImageService, *, max_body_bytes: int) -> None:
    models = frozenset(service.lock.models)

    @app.post(ROUTE, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": OpenAIImageRequest.model_json_schema()}}}})
    async def generations(request: Request) -> JSONResponse:
        """OpenAI's images API shape over the same service (README § OpenAI-compatible)."""
        try:
            principal = await service.authenticate(request.headers, peer(request))
            body = await read_json_body(request, max_body_bytes)
            with stage("validate"):
                o = validate(OpenAIImageRequest, load_json(body))
                req = to_generate_request(o, models)
            if who := o.safety_identifier or o.user:
                annotate(openai_user=hashlib.sha256(who.encode()).hexdigest()[:16])
            resp = await service.generate(req, request_id(request), principal,
                                          idempotency_key(request))
            # a local store's link is a path here: absolute, as on /v1/images
            answer = to_openai(absolute(request, resp), QUALITY_NAME.get(o.quality or ""))
        except ImagegenError as e:
            return error(request, e)
        return JSONResponse(answer, headers=id_header(request))

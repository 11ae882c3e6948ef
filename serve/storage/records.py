"""What the object store keeps beside the images (stage 11). Each request's image
gets its own id and sidecar (`images/<id>.json`: owner, recipe, verdict, alt text,
timings, cost, retention); the bytes live once per recipe key
(`objects/<kk>/<key>.<ext>`, the same recipe's images deduplicated), with a small
record (`objects/<kk>/<key>.json`: what a cache hit answers with). Writes go object,
then record, then sidecar: readers trust a record only beside its object, and a
sidecar only beside both."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..schemas import AltText, ImageSafety
from .recipe import Recipe


def object_key(key: str, ext: str) -> str:
    return f"objects/{key[:2]}/{key}.{ext}"


def record_key(key: str) -> str:
    return f"objects/{key[:2]}/{key}.json"


def sidecar_key(image_id: str) -> str:
    return f"images/{image_id}.json"


def new_image_id() -> str:
    return "img_" + secrets.token_hex(12)


class ObjectRecord(BaseModel):
    """One stored object: enough to answer a cache hit without its model, and the
    classifier's scores to judge it again under the policy in force."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mime_type: str
    width: int
    height: int
    bytes: int
    scores: dict[str, float] | None = Field(None, description="None: unchecked")
    action: str = Field(description="the verdict it was delivered under")
    created: dt.datetime


class ImageInfo(BaseModel):
    """An image's sidecar as its owner sees it (GET /v1/images/{id})."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    request_id: str
    created: dt.datetime
    expires: dt.datetime | None = Field(None, description="when `imagegen storage gc` may "
                                        "remove it (the plan's retention)")
    mime_type: str
    width: int
    height: int
    aspect_ratio: str | None = None
    seed: int
    tier: str
    model: str
    revision: str
    template: str | None = None
    recipe: Recipe
    request: dict[str, Any] = Field(description="the request's fields, for a reroll")
    approval_id: str | None = None
    safety: ImageSafety
    alt_text: AltText | None = None
    cost_units: float = Field(description="this image's share of the request's cost")
    cached: bool = False
    timings: dict[str, float] = Field(default_factory=dict)


class ImageRecord(ImageInfo):
    """The sidecar as stored: with its owner (hashed) and where its bytes are."""

    owner: str = Field(description="the owning principal, hashed")
    key: str | None = Field(None, description="the recipe key; None for a withheld image")
    ext: str

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"owner", "key", "ext"})


class StoredImage(ImageInfo):
    url: str | None = Field(None, description="where to GET its bytes (none if withheld)")


class RerollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = Field(
        None, description="the new image's seed (drawn when absent)")

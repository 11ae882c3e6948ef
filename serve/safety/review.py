"""The review queue: every blocked prompt and every image the classifier flagged is
recorded durably in the state store (reason, category, principal, template@version,
hashes of the texts; the raw prompt only where `review_keep_prompts` is set; the
flagged images themselves as evidence), for reviewers to approve or reject with a
reason code, and for the blocked caller to appeal. A case of the always-on category
(sexual content involving minors) is restricted: shown to admins only, never in the
general queue, its prompt kept as hashes only. Backends: review_stores.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["open", "approved", "rejected"]
REASON = r"^[a-z][a-z0-9_]{0,63}$"


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    decision: Literal["approved", "rejected"]
    reason: Annotated[str, Field(pattern=REASON)] = Field(
        description="why, as a code counted for tuning prompts and classifiers")
    by: str
    at: dt.datetime


class Appeal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: dt.datetime
    principal: str
    message: Annotated[str, Field(min_length=1, max_length=2000)]


class FlaggedImage(BaseModel):
    """One image of an image case; its PNG is kept as evidence beside the item."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(description="its place in the request's images")
    action: Literal["review", "blur", "withhold"]
    category: str
    score: float
    scores: dict[str, float] = Field(description="every category the classifier scored")
    sha256: str = Field(description="of the unblurred PNG kept as evidence")
    width: int
    height: int


class ReviewItem(BaseModel):
    """One blocked or flagged request, as reviewers see it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    created: dt.datetime
    kind: Literal["prompt", "image"] = "prompt"
    stage: str = Field(description="the stage that blocked it (prompt_safety, image_safety)")
    category: str
    reason: str
    field: str = Field(description="what was blocked: prompt, negative_prompt, variables.NAME")
    principal: str
    request_id: str
    template: str | None = None
    prompt_sha256: str
    negative_prompt_sha256: str
    prompt: str | None = Field(None, description="kept only where review_keep_prompts is set")
    restricted: bool = Field(False, description="the always-on category: admins only")
    images: list[FlaggedImage] = Field(default_factory=list, description="an image case's "
                                       "flagged images (GET /v1/review/{id}/images/{index})")
    classifier: str | None = Field(None, description="the classifier that flagged them")
    status: Status = "open"
    decision: Decision | None = None
    appeals: list[Appeal] = Field(default_factory=list)


class AppealReceipt(BaseModel):
    """What the appealing caller gets back: that its appeal joined the case, never the
    case itself (scores, hashes, a reviewer's decision)."""

    case: str
    request_id: str
    appeals: int
    status: Status

    @classmethod
    def of(cls, item: ReviewItem) -> AppealReceipt:
        return cls(case=item.id, request_id=item.request_id, appeals=len(item.appeals),
                   status=item.status)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_item(**fields) -> ReviewItem:
    return ReviewItem(id=uuid.uuid4().hex[:16], created=dt.datetime.now(dt.UTC), **fields)


class ReviewQueue(Protocol):
    async def add(self, item: ReviewItem, evidence: dict[int, bytes] | None = None) -> None:
        """Keep the item (and its images' PNGs by index) once; a retried add is a no-op."""
        ...

    async def evidence(self, item_id: str, index: int) -> bytes | None: ...

    async def get(self, item_id: str) -> ReviewItem | None: ...

    async def list(self, status: Status | None = "open", *, restricted: bool = False,
                   limit: int = 100) -> list[ReviewItem]:
        """Oldest first; restricted items only when `restricted`, and then only they."""
        ...

    async def decide(self, item_id: str, decision: Decision) -> ReviewItem | None:
        """Record the decision (a later one replaces it); None for no such item."""
        ...

    async def appeal(self, request_id: str, appeal: Appeal) -> ReviewItem | None:
        """Add the appeal to the item of the blocked request `request_id` if it is the
        appealing principal's; None otherwise."""
        ...

    async def close(self) -> None: ...


def open_review(state_url: str) -> ReviewQueue:
    from ..quotas.keys import sqlite_path, state_backend

    if state_backend(state_url) == "sqlite":
        from .review_stores import SQLiteReview

        return SQLiteReview(sqlite_path(state_url))
    from .review_stores import RedisReview

    return RedisReview(state_url)

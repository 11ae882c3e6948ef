"""Recipes and their keys: what makes an image what it is, and the name it is stored
under. The key is an HMAC of the recipe and its cache scope under a server secret,
so nobody can compute an object's key (or URL) from a prompt, and one principal's
key never names another's image. Pure."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict

# Bump when post-processing changes what the same recipe produces (encoding,
# provenance, watermark, blur): older objects stop being hits.
POSTPROCESS_VERSION = 1


class Recipe(BaseModel):
    """One image's recipe: the revision that served it (after routing), the template
    (or none: a raw prompt), the rendered prompts, the seed and the generation and
    delivery settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    revision: str  # model name@revision
    template: str | None
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    output_format: str
    quality: int | None
    watermark: bool
    c2pa: bool = False  # a signed C2PA manifest in the bytes
    postprocess: int = POSTPROCESS_VERSION

    def key(self, secret: bytes, scope: str) -> str:
        """The recipe's name in the store for `scope` (a principal, or `shared`)."""
        body = json.dumps({"scope": scope, **self.model_dump()}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False)
        return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()


def owner_hash(secret: bytes, principal: str) -> str:
    """A principal as a sidecar records it: compared, never shown."""
    return hmac.new(secret, b"owner\0" + principal.encode(), hashlib.sha256).hexdigest()[:32]


def load_secret(value: str | None, path: Path) -> bytes:
    """The server secret: the setting's value, else the one kept at `path` (made on
    first use, owner-only), as the local dev key is."""
    if value:
        return value.encode()
    if path.is_file():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret

"""Principals and API keys. Pure: no I/O.

A key is `ig_<key id>_<secret>`: the id names it in listings and logs (never the
secret), the whole key is stored only as its SHA-256. A fast hash is right here:
keys are 160 random bits, not passwords, so there is nothing to brute-force, and
every request looks one up.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import Unauthenticated

Role = Literal["user", "reviewer", "admin"]
ROLES: tuple[Role, ...] = ("user", "reviewer", "admin")
_KEY = re.compile(r"^ig_([a-z0-9]{12})_[A-Za-z0-9_-]{27}$")
NAME = r"^[A-Za-z0-9._@:-]{1,128}$"  # a principal or plan


class KeyRecord(BaseModel):
    """One API key as stored: who it is, what it may do, never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    key_id: Annotated[str, Field(pattern=r"^[a-z0-9]{12}$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    principal: Annotated[str, Field(pattern=NAME)]
    roles: tuple[Role, ...] = ("user",)
    plan: Annotated[str, Field(pattern=NAME)] = "default"
    created: float = Field(default_factory=time.time)
    revoked: float | None = None  # unix seconds; a revoked key authenticates nobody


class Principal(BaseModel):
    """Who a request comes from: what stages decide on (roles, plan)."""

    model_config = ConfigDict(frozen=True)

    name: str
    roles: frozenset[Role]
    plan: str
    key_id: str | None = None  # None: the identity came from a trusted header

    def has(self, role: Role) -> bool:
        return role in self.roles or "admin" in self.roles


def new_key() -> tuple[str, str]:
    """(key id, key): a fresh key, shown to its owner once."""
    key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    return key_id, f"ig_{key_id}_{secrets.token_urlsafe(20)}"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def record_for(key: str, key_id: str, principal: str, roles: tuple[Role, ...] = ("user",),
               plan: str = "default") -> KeyRecord:
    return KeyRecord(key_id=key_id, sha256=key_hash(key), principal=principal,
                     roles=tuple(dict.fromkeys(roles)), plan=plan)


def bearer(header: str | None) -> str:
    """The API key in an `Authorization: Bearer <key>` value; Unauthenticated when
    it is missing or malformed (never echoing it)."""
    if not header:
        raise Unauthenticated("missing API key: send Authorization: Bearer <key>")
    scheme, _, key = header.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <key>'")
    if not _KEY.match(key):
        raise Unauthenticated("invalid API key")
    return key

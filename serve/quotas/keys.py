"""Where API keys live: the state store (`state_url`: SQLite or Redis, one contract,
tests/unit/test_state_contract.py) and, read-only beside it, a mounted keys file (a
Kubernetes Secret). The backends are serve/quotas/sqlite_backend.py and
redis_backend.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError
from . import yamlfile
from .principals import KeyRecord


class KeyExists(Exception):
    """add() of a key id or hash the store already holds."""


class KeyStore(Protocol):
    async def add(self, record: KeyRecord) -> None:
        """Store a new key; KeyExists if its id or hash is taken."""

    async def find(self, sha256: str) -> KeyRecord | None:
        """The key with this hash (revoked ones too), or None."""

    async def revoke(self, key_id: str) -> bool:
        """Mark the key revoked; False when there is no such key."""

    async def list(self) -> list[KeyRecord]:
        """Every key, oldest first."""

    async def close(self) -> None: ...


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyRecord] = []


class FileKeys:
    """Keys from a YAML file (`keys: [{key_id, sha256, principal, roles, plan}]`), as a
    Secret mounts it; read once at start. Read-only: revoke by editing the Secret."""

    def __init__(self, path: Path) -> None:
        self.by_hash = {k.sha256: k for k in yamlfile.load(path, _KeysFile, "keys file").keys}

    async def find(self, sha256: str) -> KeyRecord | None:
        return self.by_hash.get(sha256)


def state_backend(state_url: str) -> str:
    """`sqlite` or `redis` (one server or a Redis Cluster): which backend takes
    `state_url`; ConfigError for neither (checked at start, and by every store that
    opens it)."""
    if state_url.startswith("sqlite://"):
        sqlite_path(state_url)
        return "sqlite"
    if state_url.startswith(("redis://", "rediss://")):
        return "redis"
    if state_url.startswith(("redis+cluster://", "rediss+cluster://")):
        _cluster_seed(state_url)
        return "redis"
    scheme = state_url.partition("://")[0][:32]  # never the rest: it may hold a password
    raise ConfigError(f"state_url scheme {scheme!r}: expected sqlite:///PATH, "
                      "redis://HOST:PORT/DB or redis+cluster://HOST:PORT")


def _cluster_seed(url: str) -> None:
    # Quote the bad part only: the URL may hold a password.
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConfigError("state_url: a Redis Cluster URL names one node: "
                          "redis+cluster://HOST:PORT")
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(f"state_url: a Redis Cluster has database 0 only, not {parts.path!r}")


def open_keys(state_url: str) -> KeyStore:
    """The key store of the state store at `state_url`."""
    if state_backend(state_url) == "sqlite":
        from .sqlite_backend import SQLiteKeys

        return SQLiteKeys(sqlite_path(state_url))
    from .redis_backend import RedisKeys

    return RedisKeys(state_url)


def sqlite_path(url: str) -> Path:
    path = url.removeprefix("sqlite://")
    if not path.startswith("/"):
        raise ConfigError(f"state_url {url!r}: expected sqlite:///ABSOLUTE/PATH")
    return Path(path)


DEV_PRINCIPAL = "local-dev"


def dev_key_file(state_url: str) -> Path | None:
    """Where the local development key is kept (beside a SQLite state store, 0600)."""
    return sqlite_path(state_url).parent / "dev-key" if state_url.startswith("sqlite://") \
        else None


async def ensure_dev_key(state_url: str) -> tuple[str, bool] | None:
    """(key, made now) of the local development key (`local-dev`, roles user and
    admin) for a SQLite state store; made on first run, when the store holds no
    active key. None when keys are managed otherwise (Redis, or other keys exist)."""
    from .principals import key_hash, new_key, record_for

    path = dev_key_file(state_url)
    if path is None:
        return None
    store = open_keys(state_url)
    try:
        if path.exists():
            key = path.read_text().strip()
            found = await store.find(key_hash(key))
            if found is not None and found.revoked is None:
                return key, False
        if any(r.revoked is None for r in await store.list()):
            return None
        key_id, key = new_key()
        await store.add(record_for(key, key_id, DEV_PRINCIPAL, ("user", "admin")))
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # an older file keeps its mode otherwise
            f.write(key + "\n")
        return key, True
    finally:
        await store.close()

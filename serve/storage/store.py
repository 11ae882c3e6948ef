"""The object store: one interface, two backends chosen by URL (`file:///abs/path`, a
local directory, the embedded default; `s3://bucket/prefix`, S3 or an S3-compatible
endpoint), one contract suite (tests/unit/test_storage_contract.py).

Keys are relative, `/`-separated strings (`objects/ab/abcd.webp`), checked the same
way on every backend so a key that works on a laptop works on the cluster. A write is
atomic: a reader sees the old object or the new one, never part of one. Failing to
reach or write the store raises StorageUnavailable; a missing object is not a failure.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError

MAX_KEY = 1024  # S3's limit, in bytes (keys are ASCII)
MAX_SEGMENT = 255  # a file name's limit on every local filesystem we run on
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
SSE_MODES = ("AES256", "aws:kms")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str,
                  cache_control: str | None = None) -> None:
        """Store `data` under `key`, replacing what was there, atomically."""

    async def get(self, key: str) -> bytes | None:
        """The object's bytes; None when there is none."""

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove the object; a missing one is fine."""

    async def keys(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix` (a string prefix, as S3's), sorted."""

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL that GETs the object for `expires_s` seconds without credentials;
        None where the service serves the object itself (the local directory)."""

    async def close(self) -> None: ...


def check_key(key: str) -> str:
    """`key` if it is a valid object key, else ValueError saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key {key!r}: must be a non-empty string")
    if len(key) > MAX_KEY:
        raise ValueError(f"object key {key[:40]!r}...: longer than {MAX_KEY} characters")
    if not (key.isascii() and key.isprintable()):
        raise ValueError(f"object key {key!r}: printable ASCII only")
    if "\\" in key:
        raise ValueError(f"object key {key!r}: no backslash (segments are separated by /)")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r}: must be relative (no leading /)")
    for segment in key.split("/"):
        if not segment:
            raise ValueError(f"object key {key!r}: empty segment")
        # covers '.' and '..' (no escaping the root) and the local store's temp files
        if segment.startswith("."):
            raise ValueError(f"object key {key!r}: a segment may not start with '.'")
        if len(segment) > MAX_SEGMENT:
            raise ValueError(f"object key {key!r}: a segment is longer than {MAX_SEGMENT}")
    return key


def check_prefix(prefix: str) -> str:
    """`prefix` if it is empty (every key) or the start of a valid key, else ValueError."""
    if prefix == "":
        return prefix
    check_key(prefix.removesuffix("/"))
    return prefix


def check_expiry(expires_s: int) -> int:
    if not isinstance(expires_s, int) or not 1 <= expires_s <= MAX_PRESIGN_S:
        raise ValueError(f"expires_s {expires_s!r}: must be 1 to {MAX_PRESIGN_S} seconds")
    return expires_s


def open_store(url: str, *, endpoint_url: str | None = None, sse: str | None = None,
               kms_key_id: str | None = None) -> ObjectStore:
    """The store a storage URL names. `endpoint_url` (an S3-compatible server), `sse`
    (AES256 or aws:kms) and `kms_key_id` (with aws:kms) apply to s3:// only.
    ConfigError for anything else; no I/O happens here."""
    try:
        parts = urlsplit(url)
    except (TypeError, ValueError):
        raise ConfigError("storage URL: not a URL (file:///abs/path or s3://bucket/prefix)") \
            from None
    if parts.username is not None or parts.password is not None:
        # never quote the URL: it carries a secret (credentials come from the environment)
        raise ConfigError("storage URL: no credentials in the URL (use the AWS_* environment)")
    if parts.query or parts.fragment:
        raise ConfigError(f"storage URL {url!r}: no query or fragment")
    if parts.scheme == "file":
        if endpoint_url or sse or kms_key_id:
            # silently ignoring them would leave someone believing images are encrypted
            raise ConfigError(f"storage URL {url!r}: endpoint_url, sse and kms_key_id "
                              "apply to s3:// only")
        return _local(url, parts)
    if parts.scheme == "s3":
        return _s3(url, parts, endpoint_url, sse, kms_key_id)
    raise ConfigError(f"storage URL {url!r}: the scheme must be file:// (a local directory, "
                      "file:///abs/path) or s3:// (s3://bucket/prefix)")


def _local(url: str, parts) -> ObjectStore:
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(f"storage URL {url!r}: a file URL names an absolute path "
                          "after three slashes (file:///abs/path)")
    path = unquote(parts.path)
    if not path.startswith("/") or path == "/":
        raise ConfigError(f"storage URL {url!r}: needs an absolute directory path "
                          "(file:///abs/path)")
    from .local import LocalStore

    return LocalStore(Path(path))


def _s3(url: str, parts, endpoint_url: str | None, sse: str | None,
        kms_key_id: str | None) -> ObjectStore:
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"storage URL {url!r}: {bucket!r} is not a bucket name "
                          "(3-63 lowercase letters, digits, '.' or '-')")
    if prefix:
        try:
            check_key(prefix)
        except ValueError as e:
            raise ConfigError(f"storage URL {url!r}: bad prefix: {e}") from None
    if endpoint_url is not None:
        endpoint = urlsplit(endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
            raise ConfigError(f"S3 endpoint_url {endpoint_url!r}: must be http(s)://host[:port]")
    if sse is not None and sse not in SSE_MODES:
        raise ConfigError(f"S3 sse {sse!r}: must be one of {', '.join(SSE_MODES)}")
    if kms_key_id and sse != "aws:kms":
        raise ConfigError(f"S3 kms_key_id is set but sse is {sse!r}: it needs sse=aws:kms")
    from .s3 import S3Store

    return S3Store(bucket, prefix, endpoint_url=endpoint_url, sse=sse, kms_key_id=kms_key_id)

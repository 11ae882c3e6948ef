"""Batch-completion webhooks in the Standard Webhooks scheme (standardwebhooks.com).

Each delivery is a JSON POST `{"type", "timestamp", "data"}` with three headers:
`webhook-id` (the same on every retry, so receivers can deduplicate),
`webhook-timestamp` (unix seconds of the attempt) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
Secrets travel as `whsec_` + base64. `verify` is the receiver's half.

SSRF: a caller chooses the URL, so `check` admits only http(s) URLs under an
operator's allowlist prefix, without userinfo, and refuses IP literals in
private, loopback, link-local or reserved ranges unless the allowlist names that
exact address. At send time a DNS name is resolved and refused if any address is
internal. Hazard (DNS rebinding): httpx resolves the name again to connect, so a
name whose owner flips its records between the two lookups can still reach an
internal address; the allowlist of trusted domains is the real guard, and an
egress NetworkPolicy the backstop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import random
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

import httpx

from ..errors import ConfigError, InvalidRequest

log = logging.getLogger("imagegen.webhooks")

SECRET_PREFIX = "whsec_"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_EXPONENT = 64  # 2**attempt beyond this overflows float and exceeds any cap anyway

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)).

    `attempt` counts from 0 (the delay after the first failure)."""
    return rng.uniform(0.0, min(cap, base * 2 ** min(attempt, _MAX_EXPONENT)))


# -- signing ------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret in the `whsec_` + base64 form receivers are given."""
    return format_secret(secrets.token_bytes(32))


def format_secret(secret: bytes) -> str:
    return SECRET_PREFIX + base64.b64encode(secret).decode()


def parse_secret(text: str) -> bytes:
    """The raw key of a `whsec_...` secret (the prefix is optional)."""
    raw = text.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except ValueError:
        raise ConfigError("webhook secret is not whsec_ + base64") from None
    if not key:
        raise ConfigError("webhook secret is empty")
    return key


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` + base64 HMAC-SHA256 of id.timestamp.body."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, content, hashlib.sha256).digest()).decode()


def signed_headers(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def verify(secret: bytes | str, headers: Mapping[str, str], body: bytes | str,
           tolerance_s: float = 300, *, now: float | None = None) -> bool:
    """True when one `v1` signature in `headers` matches `body` under `secret` and
    the timestamp is within `tolerance_s` of now (either side: replays and clocks
    far ahead are both refused). Never raises on malformed headers."""
    key = parse_secret(secret) if isinstance(secret, str) else secret
    data = body.encode() if isinstance(body, str) else body
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id", "")
    stamp = lower.get("webhook-timestamp", "")
    if not msg_id or not stamp.isascii() or not stamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance_s:
        return False
    expected = sign(key, msg_id, int(stamp), data).encode()
    # Several space-separated signatures are allowed (key rotation); any one suffices.
    return any(hmac.compare_digest(expected, s.encode())
               for s in lower.get("webhook-signature", "").split() if s.startswith("v1,"))


# -- the allowlist --------------------------------------------------------------------


class _Prefix(NamedTuple):
    scheme: str
    host: str
    port: int
    path: str

    def admits(self, scheme: str, host: str, port: int, path: str) -> bool:
        if (scheme, host, port) != (self.scheme, self.host, self.port):
            return False
        # Match whole segments: /hooks admits /hooks/x but not /hooksevil.
        prefix = self.path if self.path.endswith("/") else self.path + "/"
        return path == self.path or path.startswith(prefix)


class _Parts(NamedTuple):
    scheme: str
    host: str
    port: int
    path: str


def _split(url: str) -> _Parts:
    """Scheme, host, effective port and path of an http(s) URL; ValueError names why not."""
    # Backslashes, spaces and non-ASCII are parsed differently by different URL parsers
    # (the classic allowlist bypass); a webhook URL never needs them.
    if not url.isascii() or not url.isprintable() or any(c in url for c in " \\"):
        raise ValueError("has characters a webhook URL never needs")
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError("is not http or https")
    if "@" in parts.netloc:
        raise ValueError("carries credentials (userinfo)")
    if not parts.hostname:
        raise ValueError("has no host")
    port = parts.port or _DEFAULT_PORTS[parts.scheme]  # .port raises ValueError if bad
    path = parts.path or "/"
    # /hooks/../admin matches the prefix /hooks/ but the server resolves it elsewhere.
    if any(seg in (".", "..") for seg in unquote(path).split("/")):
        raise ValueError("has dot segments in its path")
    return _Parts(parts.scheme, parts.hostname.lower(), port, path)


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _internal(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 reaches 10.0.0.1
    return not ip.is_global or ip.is_multicast


def _redact(url: str) -> str:
    """The URL for logs: scheme, host and path; queries often carry tokens."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{parts.path}"


def _not_allowed(url: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"webhook_url {_redact(url)!r} {why}",
                          details=[{"field": "webhook_url", "type": "not_allowed"}])


# -- delivery ---------------------------------------------------------------------------


class _Refused(Exception):
    """The URL's host resolved to an internal address: not retried."""


class Webhooks:
    """Signs and delivers batch events to allowlisted URLs, retrying transient failures.

    `rng` and `sleep` are injectable so tests see the exact backoff delays.
    `check_resolved=False` skips the send-time DNS check, for receivers inside the
    cluster behind DNS names (the allowlist is then the only guard)."""

    def __init__(self, secret: bytes, allowlist: list[str], *, timeout_s: float = 5.0,
                 attempts: int = 6, base_delay_s: float = 1.0, max_delay_s: float = 300.0,
                 check_resolved: bool = True, rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        if not secret:
            raise ConfigError("webhook secret is empty")
        if attempts < 1 or timeout_s <= 0 or base_delay_s < 0 or max_delay_s < 0:
            raise ConfigError(f"webhook retry settings out of range: attempts={attempts}, "
                              f"timeout_s={timeout_s}, base_delay_s={base_delay_s}, "
                              f"max_delay_s={max_delay_s}")
        self._secret = secret
        self._prefixes = [self._prefix(entry) for entry in allowlist]
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.check_resolved = check_resolved
        self._rng = rng or random.Random()
        self._sleep = sleep

    @staticmethod
    def _prefix(entry: str) -> _Prefix:
        try:
            return _Prefix(*_split(entry))
        except ValueError as e:
            raise ConfigError(f"webhook allowlist entry {entry!r} {e}") from None

    def check(self, url: str) -> None:
        """Raise InvalidRequest (details field webhook_url, type not_allowed) unless
        `url` may receive webhooks. No DNS lookup: see `send` for the resolved check."""
        try:
            scheme, host, port, path = _split(url)
        except ValueError as e:
            raise _not_allowed(url, str(e)) from None
        ip = _ip(host)
        if ip is not None and _internal(ip) and all(p.host != host for p in self._prefixes):
            raise _not_allowed(url, "is an internal address")
        if not any(p.admits(scheme, host, port, path) for p in self._prefixes):
            raise _not_allowed(url, "is not on the webhook allowlist")

    async def send(self, url: str, event: str, payload: dict, *,
                   msg_id: str | None = None) -> bool:
        """Deliver one event; True once a receiver answers 2xx. False (logged, never
        raised) when the URL is refused, a receiver answers another 4xx or a redirect,
        or every attempt fails. Cancellation propagates at once (run it as a task).

        `msg_id` (the webhook-id) defaults to a fresh id; pass a stable one (batch
        and event) so a redelivery after a restart deduplicates at the receiver."""
        msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
        target = _redact(url)
        try:
            self.check(url)
            body = json.dumps({"type": event, "timestamp": _now_iso(), "data": payload},
                              separators=(",", ":")).encode()
            # trust_env=False: no proxy from the environment, so the address checked is
            # the address reached; redirects are not followed (each hop would need check).
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False,
                                         trust_env=False) as client:
                return await self._deliver(client, url, msg_id, body, target)
        except InvalidRequest as e:
            log.warning("webhook %s to %s refused: %s", msg_id, target, e.message)
        except _Refused as e:
            log.warning("webhook %s to %s refused: %s", msg_id, target, e)
        except Exception:  # never raise for a delivery; CancelledError is not an Exception
            log.exception("webhook %s to %s failed", msg_id, target)
        return False

    async def _deliver(self, client: httpx.AsyncClient, url: str, msg_id: str, body: bytes,
                       target: str) -> bool:
        for attempt in range(self.attempts):
            retry_after: float | None = None
            try:
                await self._check_resolved(url)
                status, retry_after = await self._post(client, url, msg_id, body)
            except (httpx.TransportError, TimeoutError, OSError) as e:
                log.info("webhook %s to %s attempt %d: %s", msg_id, target, attempt + 1,
                         type(e).__name__)
            else:
                if 200 <= status < 300:
                    return True
                if status != 429 and status < 500:
                    log.warning("webhook %s to %s answered %d: not retried", msg_id, target,
                                status)
                    return False
                log.info("webhook %s to %s attempt %d answered %d", msg_id, target,
                         attempt + 1, status)
            if attempt + 1 < self.attempts:
                await self._sleep(self._delay(attempt, retry_after))
        log.warning("webhook %s to %s gave up after %d attempts", msg_id, target,
                    self.attempts)
        return False

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.max_delay_s, retry_after)
        return backoff(attempt, self.base_delay_s, self.max_delay_s, self._rng)

    async def _post(self, client: httpx.AsyncClient, url: str, msg_id: str,
                    body: bytes) -> tuple[int, float | None]:
        headers = signed_headers(self._secret, msg_id, int(time.time()), body)
        headers["content-type"] = "application/json"
        # httpx's timeout is per phase; this bounds the whole attempt (a slow drip too).
        async with asyncio.timeout(self.timeout_s):
            # Stream and never read the body: a receiver cannot make us buffer megabytes.
            async with client.stream("POST", url, content=body, headers=headers) as r:
                retry_after = _retry_after(r) if r.status_code in (429, 503) else None
                return r.status_code, retry_after

    async def _check_resolved(self, url: str) -> None:
        if not self.check_resolved:
            return
        parts = _split(url)
        if _ip(parts.host) is not None:
            return  # an IP literal: check() already judged it (or the allowlist named it)
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.host, parts.port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            ip = _ip(str(sockaddr[0]).split("%", 1)[0])
            if ip is None or _internal(ip):
                raise _Refused(f"{parts.host} resolves to internal address {sockaddr[0]}")


def _retry_after(response: httpx.Response) -> float | None:
    """A numeric Retry-After in seconds; None for a date or garbage (backoff then)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

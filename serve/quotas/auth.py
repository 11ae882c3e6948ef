"""Stage 1, authenticate: an `Authorization: Bearer <key>` value -> the Principal,
from the mounted keys file or the state store. Lookups are cached for a few
seconds (a revoked key stops working within `ttl_s`); a store that cannot be
reached fails closed (503 state_unavailable), never open.

Behind a gateway that authenticates callers itself, a trusted upstream may name the
principal in a header instead (`Upstream`): only from the configured proxy
addresses, and off by default. From any other address the header is ignored."""

from __future__ import annotations

import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import Unauthenticated
from .keys import FileKeys, KeyStore
from .principals import NAME, KeyRecord, Principal, bearer, key_hash

CACHE_TTL_S = 5.0
CACHE_SIZE = 4096  # bad keys are cached too: bounded, so random ones cannot grow it


@dataclass(frozen=True)
class Upstream:
    """A gateway trusted to name the caller: `header` carries the principal's name
    when the request comes from one of `proxies` (addresses or networks); such a
    principal has role `user` and plan `plan`."""

    proxies: tuple[str, ...]
    header: str = "x-imagegen-principal"  # lowercase: HTTP headers and gRPC metadata
    plan: str = "default"
    nets: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # ValueError for an address that is none (the settings check it first)
        object.__setattr__(self, "nets", tuple(ipaddress.ip_network(p, strict=False)
                                               for p in self.proxies))

    def trusts(self, peer: str | None) -> bool:
        try:
            address = ipaddress.ip_address(peer or "")
        except ValueError:
            return False
        address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:10.0.0.5
        return any(address in net for net in self.nets)

    def principal(self, name: str) -> Principal:
        if not re.fullmatch(NAME, name):
            raise Unauthenticated(f"the {self.header} header from the gateway is not a "
                                  "principal name")
        return Principal(name=name, roles=frozenset({"user"}), plan=self.plan)


class Authenticator:
    def __init__(self, store: KeyStore | None, file: FileKeys | None = None, *,
                 upstream: Upstream | None = None, ttl_s: float = CACHE_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.file = file
        self.upstream = upstream
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()

    async def identify(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        """The caller of a request with these headers (HTTP headers or gRPC metadata,
        by lowercase name) from `peer` (its IP address)."""
        up = self.upstream
        if up is not None and (name := headers.get(up.header)) is not None and up.trusts(peer):
            getlist = getattr(headers, "getlist", None)  # HTTP; gRPC joins repeats itself
            if getlist is not None and len(getlist(up.header)) > 1:
                raise Unauthenticated(f"the {up.header} header appears more than once")
            return up.principal(name)
        return await self.authenticate(headers.get("authorization"))

    async def plan_of(self, principal: str) -> str | None:
        """The plan of `principal`'s first active key (the keys file, then the store);
        without one, a trusted gateway's plan if there is one, else None."""
        records = list(self.file.by_hash.values()) if self.file else []
        if self.store is not None:
            records += await self.store.list()
        active = [r for r in records if r.principal == principal and r.revoked is None]
        if active:
            return active[0].plan
        return self.upstream.plan if self.upstream else None  # a principal the gateway names

    async def authenticate(self, authorization: str | None) -> Principal:
        sha = key_hash(bearer(authorization))
        record = await self._lookup(sha)
        if record is None or record.revoked is not None:
            raise Unauthenticated("invalid or revoked API key")
        return Principal(name=record.principal, roles=frozenset(record.roles),
                         plan=record.plan, key_id=record.key_id)

    async def _lookup(self, sha: str) -> KeyRecord | None:
        now = self.clock()
        hit = self._cache.get(sha)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(sha)
            return hit[1]
        record = self.file.by_hash.get(sha) if self.file else None
        if record is None and self.store is not None:
            record = await self.store.find(sha)  # StateUnavailable propagates: fail closed
        self._cache[sha] = (now + self.ttl_s, record)
        self._cache.move_to_end(sha)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return record

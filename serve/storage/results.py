"""Stages 6 and 11 over one object store: the identical-request cache (recipe keys
scoped per principal, or shared where configured; concurrent identical requests
collapse into one generation in this ingress replica) and keeping every image with
its sidecar, and the URLs that reach them (a presigned S3 GET, a CDN base URL, or
the ingress's own signed `/v1/files/...`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from typing import Literal, NamedTuple

from ..errors import StorageUnavailable
from .records import ImageRecord, ObjectRecord, object_key, record_key, sidecar_key
from .store import ObjectStore, check_key

Scope = Literal["principal", "shared"]
FILES_ROUTE = "/v1/files/"
# An object never changes under its key: caches may keep it as long as they like;
# shared caches only where a CDN serves the bucket (else each link is one caller's).
IMMUTABLE = "public, max-age=31536000, immutable"
PRIVATE = "private, max-age=31536000, immutable"
# What a blurred image is kept under, beside its recipe key: never a cache hit (a hit
# is delivered as generated), never the unblurred bytes behind a blurred verdict.
BLURRED = "-blur"
_SIG = re.compile(r"[0-9a-f]{32}")


class Kept(NamedTuple):
    """One image to keep under its recipe key: the object and its record."""

    key: str
    ext: str
    mime: str
    data: bytes
    record: ObjectRecord


class Results:
    def __init__(self, store: ObjectStore, secret: bytes, *, scope: Scope = "principal",
                 url_ttl_s: int = 3600, cdn_base_url: str | None = None) -> None:
        self.store = store
        self.secret = secret
        self.scope_mode = scope
        self.url_ttl_s = url_ttl_s
        self.cdn_base_url = cdn_base_url.rstrip("/") if cdn_base_url else None
        self.cache_control = IMMUTABLE if self.cdn_base_url else PRIVATE
        self._flights: dict[str, asyncio.Future] = {}

    def scope(self, principal: str | None) -> str:
        """Whose cache a request reads: its principal's (a hit never tells a caller
        what someone else asked), or everyone's where sharing is configured."""
        return "shared" if self.scope_mode == "shared" else f"p:{principal or 'anonymous'}"

    # Stage 6: lookup and single flight.

    async def lookup(self, keys: list[str], exts: list[str]) -> list[ObjectRecord] | None:
        """Every key's record, if every one is complete (record and object); else
        None. A store that fails is a miss: the request generates instead."""
        try:
            raws = await asyncio.gather(*(self.store.get(record_key(k)) for k in keys))
            if any(r is None for r in raws):
                return None
            if not all(await asyncio.gather(*(self.store.exists(object_key(k, x))
                                               for k, x in zip(keys, exts, strict=True)))):
                return None
        except StorageUnavailable:
            return None
        return [ObjectRecord.model_validate_json(r) for r in raws]

    async def wait_for_flight(self, flight: str) -> bool:
        """If an identical request is generating in this replica, wait for it to end
        (True: look again, once: a leader that failed or kept nothing leaves each
        follower to generate on its own, at once); False if none is."""
        running = self._flights.get(flight)
        if running is None:
            return False
        with contextlib.suppress(Exception):
            await asyncio.shield(running)
        return True

    @contextlib.contextmanager
    def lead(self, flight: str | None) -> Iterator[None]:
        """This request generates for its identical followers; they look again when
        it ends, whichever way. Must be entered right after a miss, with no await
        between (one event loop: then no two requests lead one flight)."""
        if flight is None or flight in self._flights:
            yield
            return
        done = asyncio.get_running_loop().create_future()
        self._flights[flight] = done
        try:
            yield
        finally:
            del self._flights[flight]
            done.set_result(None)

    async def content(self, key: str, ext: str) -> bytes | None:
        return await self.store.get(object_key(key, ext))

    # Stage 11: keep every image.

    async def keep(self, objects: list[Kept], sidecars: list[ImageRecord]) -> None:
        """Each new object (once per key: its bytes never change), then at once (on
        S3, three round trips in a row, not four) every key's record (the
        latest verdict and scores: what the next lookup judges again) and every
        image's sidecar. A record never names a missing object, and a failure leaves
        no sidecar: an image has its id only once all of it is kept."""
        await asyncio.gather(*(self._object(o) for o in objects))
        writes = asyncio.ensure_future(asyncio.gather(
            *(self.store.put(record_key(o.key), o.record.model_dump_json().encode(),
                             "application/json") for o in objects),
            self.put_sidecars(sidecars), return_exceptions=True))
        try:
            *records, written = await asyncio.shield(writes)
        except asyncio.CancelledError:
            # The caller left: a store writes in its own thread and cancelling the
            # await would not stop it, so let the writes end, then take the sidecars
            # out (none may stay behind an image whose id nobody got).
            await asyncio.wait([writes])
            await self._remove_sidecars([r.id for r in sidecars])
            raise
        failed = next((x for x in (*records, written) if isinstance(x, BaseException)), None)
        if failed is not None:
            if not isinstance(written, BaseException):
                await self._remove_sidecars([r.id for r in sidecars])
            raise failed

    async def _object(self, o: Kept) -> None:
        path = object_key(o.key, o.ext)
        if not await self.store.exists(path):
            await self.store.put(path, o.data, o.mime, self.cache_control)

    async def put_sidecars(self, records: list[ImageRecord]) -> None:
        """Every image's sidecar, or none of them (a failure removes those written)."""
        written: list[str] = []
        try:
            for r in records:
                await self.store.put(sidecar_key(r.id), r.model_dump_json().encode(),
                                     "application/json")
                written.append(r.id)
        except BaseException:
            await self._remove_sidecars(written)
            raise

    async def _remove_sidecars(self, image_ids: list[str]) -> None:
        for image_id in image_ids:
            with contextlib.suppress(Exception):
                await self.store.delete(sidecar_key(image_id))

    async def sidecar(self, image_id: str) -> ImageRecord | None:
        """The image's sidecar if it and its object are both there."""
        raw = await self.store.get(sidecar_key(image_id))
        if raw is None:
            return None
        r = ImageRecord.model_validate_json(raw)
        if r.key is not None and not await self.store.exists(object_key(r.key, r.ext)):
            return None
        return r

    # Delivery.

    def url(self, key: str, ext: str) -> str:
        path = object_key(key, ext)
        if self.cdn_base_url:
            return f"{self.cdn_base_url}/{path}"
        presigned = self.store.presigned_url(path, self.url_ttl_s)
        if presigned is not None:
            return presigned
        expires = int(time.time()) + self.url_ttl_s
        return f"{FILES_ROUTE}{path}?expires={expires}&sig={self._sign(path, expires)}"

    def _sign(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"file\0{path}\0{expires}".encode(),
                        hashlib.sha256).hexdigest()[:32]

    def signed(self, path: str, expires: int, sig: str) -> bool:
        """Whether a /v1/files URL is one this service made and has not expired."""
        if not _SIG.fullmatch(sig) or not time.time() <= expires < 2**40:
            return False
        try:
            check_key(path)
        except ValueError:
            return False
        return hmac.compare_digest(self._sign(path, expires), sig)

    async def file(self, path: str) -> bytes | None:
        if not path.startswith("objects/") or path.endswith(".json"):
            return None  # only images are served; records and sidecars never
        return await self.store.get(path)


def flight_of(scope: str, keys: list[str]) -> str:
    return hashlib.sha256(json.dumps([scope, keys]).encode()).hexdigest()

"""`imagegen storage gc`: retention. Removes the sidecars past their `expires` (the
plan's retention_days), then the objects (and their records) no remaining sidecar
names, once their record is older than the grace period. An object is written
before its record and its sidecars, and a cache hit names an old object in a new
sidecar: so an object without a record is left (a request may be writing it), and
the sidecars written while gc ran are read again before anything is removed."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt

from .common import settings as settings_of


def add_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("storage", help="the object store: retention")
    ssub = s.add_subparsers(dest="storage_command", required=True)
    gc = ssub.add_parser("gc", help="remove expired images and the objects nothing names")
    gc.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    gc.add_argument("--grace-s", type=int, default=3600,
                    help="keep unnamed objects younger than this (default 1 h)")
    return s


def run(args: argparse.Namespace) -> int:
    from ..storage.store import open_store

    settings = settings_of(args)
    store = open_store(settings.storage_url, endpoint_url=settings.s3_endpoint_url,
                       sse=settings.s3_sse, kms_key_id=settings.s3_kms_key_id)
    try:
        counts = asyncio.run(gc(store, dry_run=args.dry_run, grace_s=args.grace_s))
    finally:
        asyncio.run(store.close())
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {counts['sidecars']} expired image(s) and {counts['objects']} unnamed "
          f"object(s); {counts['kept']} image(s) kept")
    return 0


async def gc(store, *, dry_run: bool = False, grace_s: int = 3600,
             now: dt.datetime | None = None) -> dict[str, int]:
    from tqdm import tqdm

    from ..storage.records import ImageRecord, ObjectRecord

    now = now or dt.datetime.now(dt.UTC)
    named: set[str] = set()
    expired: list[str] = []
    sidecars = await store.keys("images/")
    for path in tqdm(sidecars, desc="sidecars", unit="image", disable=not sidecars):
        raw = await store.get(path)
        if raw is None:
            continue
        record = ImageRecord.model_validate_json(raw)
        if record.expires is not None and record.expires <= now:
            expired.append(path)
        elif record.key is not None:
            named.add(record.key)
    objects = await store.keys("objects/")
    stale: list[str] = []
    by_key: dict[str, list[str]] = {}
    for path in objects:
        by_key.setdefault(path.rsplit("/", 1)[-1].split(".", 1)[0], []).append(path)
    for key, paths in tqdm(by_key.items(), desc="objects", unit="recipe", disable=not by_key):
        if key in named:
            continue
        record = next((p for p in paths if p.endswith(".json")), None)
        raw = await store.get(record) if record else None
        if raw is None:
            continue  # no record yet: a request may be writing it
        if (now - ObjectRecord.model_validate_json(raw).created).total_seconds() < grace_s:
            continue  # a request in flight may be about to name it
        stale += paths
    for path in sorted(set(await store.keys("images/")) - set(sidecars)):
        raw = await store.get(path)  # written meanwhile (a hit names an old object)
        if raw is not None and (key := ImageRecord.model_validate_json(raw).key):
            stale = [p for p in stale if p.rsplit("/", 1)[-1].split(".", 1)[0] != key]
    if not dry_run:
        for path in expired:
            await store.delete(path)
        # the image before its record: a reader never trusts a record without its object
        for path in sorted(stale, key=lambda p: p.endswith(".json")):
            await store.delete(path)
    return {"sidecars": len(expired), "objects": len({p.rsplit(".", 1)[0] for p in stale}),
            "kept": len(sidecars) - len(expired)}

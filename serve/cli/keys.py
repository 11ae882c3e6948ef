"""`imagegen keys create|revoke|list`: API keys in the state store (`state_url`), or
with --file-entry an entry for a mounted keys file (a Kubernetes Secret)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from .common import settings as settings_of


def add_parser(sub) -> argparse.ArgumentParser:
    k = sub.add_parser("keys", help="API keys: create, revoke, list")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", help="a new key for a principal (printed once)")
    c.add_argument("principal", help="who the key belongs to (a user, team or service)")
    c.add_argument("--role", action="append", choices=["user", "reviewer", "admin"],
                   help="repeatable (default: user)")
    c.add_argument("--plan", default="default", help="the principal's plan (default: default)")
    c.add_argument("--file-entry", action="store_true",
                   help="store nothing: print the key and its entry for a mounted keys file")
    r = ksub.add_parser("revoke", help="revoke a key by its id (within seconds everywhere)")
    r.add_argument("key_id")
    ls = ksub.add_parser("list", help="every key in the state store (ids, never the keys)")
    ls.add_argument("--json", action="store_true")
    return k


def _record(key: str, key_id: str, args: argparse.Namespace, settings):
    """The new key's record, or None (said why on stderr) for a name the store would
    refuse or a plan the service does not have."""
    from pydantic import ValidationError

    from ..errors import describe
    from ..quotas.plans import load_plans
    from ..quotas.principals import record_for

    try:
        record = record_for(key, key_id, args.principal, tuple(args.role or ["user"]),
                            args.plan)
    except ValidationError as e:
        print(f"error: {describe(e)} (names are 1-128 of A-Z a-z 0-9 . _ @ : -)",
              file=sys.stderr)
        return None
    plans = load_plans(settings.plans_file).plans
    if args.plan not in plans:
        print(f"error: plan {args.plan!r} is not in {settings.plans_file}; known: "
              f"{', '.join(sorted(plans))}", file=sys.stderr)
        return None
    return record


def run(args: argparse.Namespace) -> int:
    from ..quotas.keys import open_keys
    from ..quotas.principals import new_key

    settings = settings_of(args)
    if args.keys_command == "create":
        key_id, key = new_key()
        record = _record(key, key_id, args, settings)
        if record is None:
            return 2
        if args.file_entry:
            import yaml

            entry = record.model_dump(mode="json", exclude={"revoked"})
            print(f"key (shown once): {key}\nentry for the keys file:")
            print(yaml.safe_dump({"keys": [entry]}, sort_keys=False), end="")
            return 0

    async def act():
        store = open_keys(settings.state_url)
        try:
            if args.keys_command == "create":
                await store.add(record)
                return None
            if args.keys_command == "revoke":
                return await store.revoke(args.key_id)
            return await store.list()
        finally:
            await store.close()

    out = asyncio.run(act())
    if args.keys_command == "create":
        print(f"key {key_id} for {record.principal} (roles {','.join(record.roles)}, plan "
              f"{record.plan}); shown once, store it now:\n{key}")
    elif args.keys_command == "revoke":
        if not out:
            print(f"error: no key {args.key_id}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
    elif args.json:
        print(json.dumps([r.model_dump(mode="json", exclude={"sha256"}) for r in out], indent=2))
    else:
        print(f"{'key id':<14}{'principal':<24}{'roles':<20}{'plan':<14}{'created':<18}state")
        for r in out:
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.created))
            state = "revoked" if r.revoked else "active"
            print(f"{r.key_id:<14}{r.principal:<24}{','.join(r.roles):<20}{r.plan:<14}"
                  f"{created:<18}{state}")
    return 0

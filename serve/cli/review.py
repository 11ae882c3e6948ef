"""`imagegen review list|show|approve|reject`: the review queue in the state store
(`state_url`), as the reviewer-role HTTP routes give it. Decisions are recorded with
who made them (`--by`) and a reason code."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys

from .common import settings as settings_of


def add_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("review", help="the review queue: blocked requests and their appeals")
    rsub = r.add_subparsers(dest="review_command", required=True)
    ls = rsub.add_parser("list", help="cases, oldest first")
    ls.add_argument("--status", choices=["open", "approved", "rejected", "all"], default="open")
    ls.add_argument("--restricted", action="store_true",
                    help="the restricted cases (sexual content involving minors) instead")
    show = rsub.add_parser("show", help="one case, with its appeals")
    show.add_argument("id")
    for verb in ("approve", "reject"):
        d = rsub.add_parser(verb, help=f"{verb} a case with a reason code")
        d.add_argument("id")
        d.add_argument("--reason", required=True, help="e.g. false_positive_art, true_positive")
        d.add_argument("--by", required=True, help="who decides (recorded)")
    return r


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..safety.review import Decision, open_review

    settings = settings_of(args)

    async def act():
        queue = open_review(settings.state_url)
        try:
            if args.review_command == "list":
                return await queue.list(None if args.status == "all" else args.status,
                                        restricted=args.restricted)
            if args.review_command == "show":
                return await queue.get(args.id)
            decision = Decision(decision="approved" if args.review_command == "approve"
                                else "rejected", reason=args.reason, by=args.by,
                                at=dt.datetime.now(dt.UTC))
            return await queue.decide(args.id, decision)
        finally:
            await queue.close()

    try:
        out = asyncio.run(act())
    except ValidationError:
        print(f"error: reason {args.reason!r} is not a code (a-z, 0-9, _)", file=sys.stderr)
        return 2
    if args.review_command == "list":
        print(f"{'id':<18}{'created':<22}{'reason':<20}{'principal':<16}{'status':<10}appeals")
        for i in out:
            print(f"{i.id:<18}{i.created:%Y-%m-%d %H:%M:%S}   {i.reason:<20}{i.principal:<16}"
                  f"{i.status:<10}{len(i.appeals)}")
        return 0
    if out is None:
        print(f"error: no review item {args.id}", file=sys.stderr)
        return 1
    print(out.model_dump_json(indent=2))
    return 0

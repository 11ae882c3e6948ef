"""`imagegen review list|show|approve|reject|report`: the review queue in the state
store (`state_url`), as the reviewer-role HTTP routes give it. Decisions are recorded
with who made them (`--by`) and a reason code; `show --save-images` writes an image
case's evidence (the unblurred PNGs) to files; `report` lists the restricted cases
(sexual content involving minors) as JSON lines, for the report the law requires."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from pathlib import Path

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
    show.add_argument("--save-images", type=Path, metavar="DIR",
                      help="write each flagged image to DIR/<id>-<index>.png (unblurred)")
    rep = rsub.add_parser("report", help="restricted cases as JSON lines, for the report to "
                          "the authorities (hashes and facts; evidence via show --save-images)")
    rep.add_argument("--since", type=dt.date.fromisoformat, metavar="YYYY-MM-DD",
                     help="cases created on or after this day (UTC)")
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
            if args.review_command == "report":
                return await queue.list(None, restricted=True, limit=1_000_000)
            if args.review_command == "show":
                item = await queue.get(args.id)
                if item is None or args.save_images is None:
                    return item, {}
                return item, {i.index: await queue.evidence(item.id, i.index)
                              for i in item.images}
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
    if args.review_command == "report":
        return report(out, args.since)
    out, evidence = out if args.review_command == "show" else (out, {})
    if out is None:
        print(f"error: no review item {args.id}", file=sys.stderr)
        return 1
    print(out.model_dump_json(indent=2))
    return save_images(out.id, evidence, args.save_images) if evidence else 0


def save_images(item_id: str, evidence: dict[int, bytes | None], folder: Path) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for index, png in evidence.items():
            if png is not None:
                path = folder / f"{item_id}-{index}.png"
                path.write_bytes(png)
                print(f"wrote {path}")
    except OSError as e:
        print(f"error: cannot write to {folder}: {e.strerror or e}", file=sys.stderr)
        return 1
    if missing := [str(i) for i, png in evidence.items() if png is None]:
        print(f"error: review item {item_id} keeps no image {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0


# What a report of a case carries: when, who, what matched, and the hashes that
# identify the evidence (never the prompt text: restricted cases keep none).
_REPORTED = {"id", "created", "kind", "stage", "category", "reason", "field", "principal",
             "request_id", "template", "prompt_sha256", "negative_prompt_sha256",
             "classifier", "status", "decision"}


def report(items, since: dt.date | None) -> int:
    for item in items:
        if since is not None and item.created.date() < since:
            continue
        line = item.model_dump(mode="json", include=_REPORTED)
        line["images"] = [i.model_dump(mode="json", exclude={"scores"}) for i in item.images]
        print(json.dumps(line, sort_keys=True))
    return 0

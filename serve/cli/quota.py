"""`imagegen quota show PRINCIPAL | grant PRINCIPAL UNITS`: a principal's budget in
the state store (bucket, credits, today, this month, reservations held), and
support credits."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys

from .common import settings as settings_of


def add_parser(sub) -> argparse.ArgumentParser:
    q = sub.add_parser("quota", help="budgets: show a principal's, grant support credits")
    qsub = q.add_subparsers(dest="quota_command", required=True)
    show = qsub.add_parser("show", help="a principal's budget now")
    show.add_argument("principal")
    show.add_argument("--plan", help="default: the plan of the principal's active key")
    grant = qsub.add_parser("grant", help="add support credits (spent once the bucket is short)")
    grant.add_argument("principal")
    grant.add_argument("units", type=float)
    return q


def run(args: argparse.Namespace) -> int:
    from ..quotas.keys import open_keys
    from ..quotas.ledger import Budget, open_ledger
    from ..quotas.plans import load_plans

    settings = settings_of(args)

    async def act():
        ledger = open_ledger(settings.state_url)
        try:
            if args.quota_command == "grant":
                if not (math.isfinite(args.units) and args.units > 0):
                    raise SystemExit("error: units must be a positive number")
                return await ledger.grant(args.principal, args.units)
            plan = args.plan
            if plan is None:
                keys = open_keys(settings.state_url)
                try:
                    mine = [k for k in await keys.list()
                            if k.principal == args.principal and k.revoked is None]
                finally:
                    await keys.close()
                if not mine:
                    raise SystemExit(f"error: {args.principal} has no active key; name --plan")
                plan = mine[0].plan
            spec = load_plans(settings.plans_file).get(plan)
            return plan, spec, await ledger.usage(args.principal, Budget.of(spec))
        finally:
            await ledger.close()

    out = asyncio.run(act())
    if args.quota_command == "grant":
        print(f"{args.principal}: credits now {out:g} cost units")
        return 0
    plan, spec, u = out
    daily = f" of {spec.daily_units:g}" if spec.daily_units else " (no daily cap)"
    print(f"{args.principal} on plan {plan}\n"
          f"  bucket    {u.tokens:.6g} of {spec.bucket.burst:g} cost units "
          f"(refills {spec.bucket.refill_per_s:g}/s)\n"
          f"  credits   {u.credits:.6g}\n"
          f"  today     {u.today:.6g}{daily}\n"
          f"  month     {u.month:.6g} charged\n"
          f"  held      {u.held} reservation(s) in flight", file=sys.stdout)
    return 0

"""`imagegen fallback enable|disable TIER`: the incident switch. Enable first makes
sure the fallback can serve (ready replicas, asked of the running service), then
flips `force_fallback` in the routing document, wherever it lives (the file, or
with --kube the ConfigMap): every ingress applies it within about a second."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from .common import settings as settings_of
from .routing import Document, add_kube_flags


def add_parser(sub) -> argparse.ArgumentParser:
    f = sub.add_parser("fallback", help="switch a tier to its fallback, or back")
    fsub = f.add_subparsers(dest="fallback_command", required=True)
    en = fsub.add_parser("enable", help="serve TIER from its fallbacks (primary last)")
    en.add_argument("tier")
    en.add_argument("--to", metavar="MODEL", help="put this models.lock revision first "
                    "among the fallbacks")
    en.add_argument("--force", action="store_true",
                    help="flip at once, without checking the fallback has ready replicas")
    en.add_argument("--url", default="http://127.0.0.1:8000",
                    help="the service whose /readyz tells whether the fallback is ready")
    dis = fsub.add_parser("disable", help="serve TIER from its primary again")
    dis.add_argument("tier")
    for p in (en, dis):
        add_kube_flags(p)
    return f


def run(args: argparse.Namespace) -> int:
    try:
        doc = Document(args, settings_of(args))
        table = doc.read()
        if args.tier not in table.tiers:
            raise ConfigError(f"no tier {args.tier!r} in {doc.where}; tiers: "
                              f"{', '.join(sorted(table.tiers))}")
        data = table.model_dump(mode="json")
        route = data["tiers"][args.tier]
        if args.fallback_command == "enable":
            if args.to:
                route["fallbacks"] = [args.to, *(m for m in route["fallbacks"] if m != args.to)]
            if not route["fallbacks"]:
                raise ConfigError(f"tier {args.tier} has no fallback; name one with --to")
            if not args.force and not _ready(args.url, route["fallbacks"][0]):
                return 1
        route["force_fallback"] = args.fallback_command == "enable"
        data["version"] = table.version + 1
        new = doc.write(data)
    except ConfigError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    r = new.tiers[args.tier]
    serving = r.fallbacks[0] if r.force_fallback else r.model
    print(f"{doc.where}: version {new.version}; tier {args.tier} now served by {serving}")
    return 0


def _ready(url: str, model: str) -> bool:
    """Does the running service see ready replicas of `model`? Says why not."""
    import httpx

    try:
        models = httpx.get(f"{url.rstrip('/')}/readyz", timeout=10).json()["models"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        print(f"error: cannot ask {url} whether {model} is ready ({e}); --force flips "
              "without asking", file=sys.stderr)
        return False
    state = models.get(model)
    if state is None or not state["ready"]:
        why = "unknown to the service" if state is None else state["reason"]
        print(f"error: {model} has no ready replica ({why}); switching now would fail "
              "requests. Fix it or scale it up, or --force", file=sys.stderr)
        return False
    return True

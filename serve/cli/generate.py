"""`imagegen generate PROMPT`: call a running service and save the images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_api_key_flag, api_key
from .common import settings as settings_of


def add_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="call a running service and save the images")
    g.add_argument("prompt")
    g.add_argument("--tier", default="draft")
    g.add_argument("-n", type=int, default=1)
    g.add_argument("--size", help="WIDTHxHEIGHT")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--negative-prompt", dest="negative_prompt")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--url", default="http://127.0.0.1:8000")
    g.add_argument("--timeout", type=float, default=300.0)
    add_api_key_flag(g)
    return g


def run(args: argparse.Namespace) -> int:
    import base64

    import httpx

    body = {"prompt": args.prompt, "tier": args.tier, "n": args.n}
    for key in ("negative_prompt", "size", "seed", "steps", "guidance"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    key = api_key(args, settings_of(args))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.post(f"{args.url.rstrip('/')}/v1/images", json=body, headers=headers,
                       timeout=args.timeout)
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
    data = r.json()
    if r.status_code != 200:
        err = data.get("error", {})
        print(f"error {r.status_code} {err.get('code')}: {err.get('message')}", file=sys.stderr)
        return 1
    out = Path(args.output)
    for i, img in enumerate(data["images"]):
        path = out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        path.write_bytes(base64.b64decode(img["b64_json"]))
        print(f"{path}  seed={img['seed']} {img['width']}x{img['height']}")
    t = data["timings"]
    print(
        f"model {data['model']}@{data['revision'][:12]} tier={data['tier']} "
        f"queue {t['queue_ms']:.0f} ms, generate {t['generate_ms']:.0f} ms, "
        f"batch of {data['batch_images']}, request {data['id']}"
    )
    return 0

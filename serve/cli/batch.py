"""`imagegen batch submit|status|list|cancel|results`: batch jobs on a running service
(README § Batch jobs), over HTTP as `imagegen generate` calls it. `imagegen batch dlq
list|replay|purge`: the dead-letter queue, on the state store directly (`state_url`),
as `imagegen review` works: operator commands, no API key.

`submit` prints the batch's id alone on stdout (`ID=$(imagegen batch submit f.jsonl)`),
how to follow it on stderr. Exit codes: 0 done (with --wait: every item succeeded);
1 the service refused (one line from its error envelope), or with --wait an item died
or the batch was cancelled, or an item named to the DLQ verbs was not moved; 2 the
service cannot be reached, a file cannot be read or written, or `purge --all` lacks
--yes; 130 Ctrl-C (while waiting: the batch keeps running)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import signal
import sys
import time
from pathlib import Path
from urllib.parse import quote

from .common import add_api_key_flag, api_key
from .common import settings as settings_of

DEFAULT_URL = "http://127.0.0.1:8000"
ENDED = ("succeeded", "dead", "cancelled", "purged")  # as BatchView.progress counts
_EVERY_DEAD = 1_000_000  # `--all`: the queue's dead(limit) has no "no limit"


class Failed(Exception):
    """One line for stderr and the exit code (never a traceback)."""

    def __init__(self, line: str, rc: int) -> None:
        super().__init__(line)
        self.line, self.rc = line, rc


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("batch", help="batch jobs: submit a JSONL file, follow, cancel, "
                       "fetch results; the dead-letter queue")
    bsub = b.add_subparsers(dest="batch_command", required=True)
    http = argparse.ArgumentParser(add_help=False)  # what every HTTP verb takes
    http.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    http.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP call")
    add_api_key_flag(http)
    s = bsub.add_parser("submit", parents=[http], help="submit a JSONL file, one generation "
                        "request (as POST /v1/images takes it) per line")
    s.add_argument("file", type=Path, metavar="FILE.jsonl")
    s.add_argument("--id", help="your id for the batch (resubmitting it is the same batch)")
    s.add_argument("--window", type=int, metavar="SECONDS",
                   help="completion window (default: the service's, 1 day)")
    s.add_argument("--webhook", metavar="URL", help="called when it ends (on the allowlist)")
    s.add_argument("--wait", action="store_true", help="show progress until it ends; exit 1 "
                   "if an item died or it was cancelled")
    st = bsub.add_parser("status", parents=[http], help="one batch: state, counts, progress")
    st.add_argument("id")
    st.add_argument("--json", action="store_true", help="the service's answer as JSON")
    ls = bsub.add_parser("list", parents=[http], help="your batches, newest first")
    ls.add_argument("--json", action="store_true", help="the service's answer as JSON")
    c = bsub.add_parser("cancel", parents=[http], help="cancel pending items (running ones "
                        "finish)")
    c.add_argument("id")
    r = bsub.add_parser("results", parents=[http], help="each item's result or error, one "
                        "JSON line per item")
    r.add_argument("id")
    r.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE, not stdout")
    _add_dlq(bsub)
    return b


def _add_dlq(bsub) -> None:
    d = bsub.add_parser("dlq", help="the dead-letter queue, on the state store (operators)")
    dsub = d.add_subparsers(dest="dlq_command", required=True)
    ls = dsub.add_parser("list", help="dead items across batches, oldest death first")
    ls.add_argument("--limit", type=_positive, default=100)
    ls.add_argument("--json", action="store_true", help="each item as a JSON line")
    for verb, what in (("replay", "back to pending, attempts reset"),
                       ("purge", "out of the DLQ for good (kept as a tombstone)")):
        p = dsub.add_parser(verb, help=f"dead items {what}")
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("item_ids", nargs="*", default=[], metavar="ITEM_ID",
                           help="<batch id>-<index>, as `dlq list` shows")
        which.add_argument("--all", action="store_true", help="every dead item")
        if verb == "purge":
            p.add_argument("--yes", action="store_true", help="confirm purge --all")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def run(args: argparse.Namespace) -> int:
    try:
        if args.batch_command == "dlq":
            return dlq(args)
        return _VERBS[args.batch_command](Api.of(args), args)
    except Failed as e:
        print(e.line, file=sys.stderr)
        return e.rc
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        return 130


class Api:
    """The service's batch routes: JSON back, or Failed with one line."""

    def __init__(self, url: str, key: str | None, timeout: float) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, timeout=timeout, headers={
            "Authorization": f"Bearer {key}"} if key else {})

    @classmethod
    def of(cls, args: argparse.Namespace) -> Api:
        return cls(args.url, api_key(args, settings_of(args)), args.timeout)

    def __call__(self, method: str, path: str, **kwargs):
        import httpx

        try:
            r = self.client.request(method, path, **kwargs)
        except httpx.ConnectError as e:
            raise Failed(f"error: cannot reach {self.url} (is the service running? "
                         f"--url sets where): {e}", 2) from None
        except httpx.HTTPError as e:
            raise Failed(f"error: {method} {self.url}{path}: {str(e) or type(e).__name__}", 2) \
                from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400 or data is None:
            raise Failed(_error_line(r, data), 1)
        return data


def _error_line(r, data) -> str:
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return f"error {r.status_code} {err.get('code')}: {err.get('message')}"
    text = " ".join(r.text.split())[:200] or "(empty body)"
    return f"error {r.status_code}: {text}"


def _path(batch_id: str, tail: str = "") -> str:
    return f"/v1/batches/{quote(batch_id, safe='')}{tail}"


def submit(api: Api, args: argparse.Namespace) -> int:
    try:
        body = args.file.read_bytes()
    except OSError as e:
        raise Failed(f"error: cannot read {args.file}: {e.strerror or e}", 2) from None
    params = {name: value for name, value in (("id", args.id), ("completion_window_s",
              args.window), ("webhook_url", args.webhook)) if value is not None}
    view = api("POST", "/v1/batches", content=body, params=params,
               headers={"Content-Type": "application/jsonl"})
    print(view["id"], flush=True)  # flushed: a script or a pipe reads it at once
    url = "" if args.url == DEFAULT_URL else f" --url {args.url}"
    n = _total(view)
    print(f"{n} item{'' if n == 1 else 's'} queued; follow: imagegen batch status "
          f"{view['id']}{url}; results: imagegen batch results {view['id']}{url}",
          file=sys.stderr)
    return wait(api, view, url) if args.wait else 0


def wait(api: Api, view: dict, url: str, poll_s: float = 1.0) -> int:
    from tqdm import tqdm

    batch_id = view["id"]
    # Ctrl-C stops waiting even where the shell started us with SIGINT ignored (a
    # background job of a script), as `imagegen serve` does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with tqdm(total=_total(view), desc=batch_id, unit="item") as bar:
            while True:
                bar.n = _ended(view)
                bar.set_postfix_str(_counts(view["counts"], ("succeeded", "dead", "leased")))
                if view["state"] != "running":
                    break
                time.sleep(poll_s)
                try:
                    view = api("GET", _path(batch_id))
                except Failed as e:
                    raise Failed(f"{e.line} (batch {batch_id} may still be running)",
                                 e.rc) from None
    except KeyboardInterrupt:
        print(f"\nstopped waiting; batch {batch_id} keeps running. Follow it with "
              f"imagegen batch status {batch_id}{url}; stop it with "
              f"imagegen batch cancel {batch_id}{url}", file=sys.stderr)
        return 130
    # stderr: stdout is the id alone, with --wait too (ID=$(imagegen batch submit ...))
    print(f"{batch_id} {view['state']}: {_counts(view['counts'], ENDED[:3], zeros=True)}"
          + (" (late)" if view["late"] else ""), file=sys.stderr)
    all_ok = view["state"] == "completed" and view["counts"]["succeeded"] == _total(view)
    return 0 if all_ok else 1


def status(api: Api, args: argparse.Namespace) -> int:
    view = api("GET", _path(args.id))
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    rows = {"id": view["id"],
            "state": view["state"] + (" (late)" if view["late"] else ""),
            "progress": f"{view['progress']:.0%} ({_ended(view)} of {_total(view)} items "
                        "ended)",
            "items": _counts(view["counts"]) or "none",
            "created": _when(view["created"]),
            "deadline": _when(view["deadline"])}
    for label, value in rows.items():
        print(f"{label:<10}{value}")
    return 0


def list_batches(api: Api, args: argparse.Namespace) -> int:
    views = api("GET", "/v1/batches")
    if args.json:
        print(json.dumps(views, indent=2))
        return 0
    print(f"{'id':<34}{'state':<11}{'created':<25}{'ended':<13}{'dead':<6}late")
    for v in views:
        print(f"{v['id']:<34}{v['state']:<11}{_when(v['created']):<25}"
              f"{f'{_ended(v)}/{_total(v)}':<13}{v['counts'].get('dead', 0):<6}"
              f"{'late' if v['late'] else ''}")
    return 0


def cancel(api: Api, args: argparse.Namespace) -> int:
    view = api("POST", _path(args.id, "/cancel"))
    if view["state"] != "cancelled":  # nothing was pending or running: it stays as it was
        print(f"{view['id']} is {view['state']}: nothing left to cancel")
        return 0
    running = view["counts"].get("leased", 0)
    print(f"{view['id']} cancelled: {view['counts'].get('cancelled', 0)} items cancelled"
          + (f", {running} running finish" if running else ""))
    return 0


def results(api: Api, args: argparse.Namespace) -> int:
    items = api("GET", _path(args.id, "/results"))
    lines = "".join(json.dumps(item) + "\n" for item in items)
    if args.output is None:
        sys.stdout.write(lines)
        return 0
    try:
        args.output.write_text(lines)
    except OSError as e:
        raise Failed(f"error: cannot write {args.output}: {e.strerror or e}", 2) from None
    succeeded = sum(item["state"] == "succeeded" for item in items)
    print(f"wrote {len(items)} results to {args.output} ({succeeded} succeeded)")
    return 0


_VERBS = {"submit": submit, "status": status, "list": list_batches, "cancel": cancel,
          "results": results}


def dlq(args: argparse.Namespace) -> int:
    from ..batch import open_queue

    if args.dlq_command == "purge" and args.all and not args.yes:
        raise Failed("error: purge --all deletes every dead item for good; add --yes", 2)
    settings = settings_of(args)

    async def act():
        queue = open_queue(settings.state_url)
        try:
            if args.dlq_command == "list":
                return await queue.dead(args.limit)
            ids = [i.id for i in await queue.dead(_EVERY_DEAD)] if args.all \
                else list(dict.fromkeys(args.item_ids))
            move = queue.replay if args.dlq_command == "replay" else queue.purge
            return ids, (await move(ids) if ids else 0)
        finally:
            await queue.close()

    out = asyncio.run(act())
    if args.dlq_command == "list":
        return _print_dead(out, args.json)
    ids, moved = out
    verb = {"replay": "replayed", "purge": "purged"}[args.dlq_command]
    if args.all and not ids:
        print("the dead-letter queue is empty")
        return 0
    print(f"{verb} {moved} of {len(ids)} {'dead' if args.all else 'named'} items"
          + ("" if moved == len(ids) else
             " (the others are not dead" + (", or their batch was cancelled)"
                                            if args.dlq_command == "replay" else ")")))
    # Every dead item named but some not moved is a mistake worth a non-zero exit;
    # under --all the rest are a cancelled batch's, which replay skips by design.
    return 0 if moved == len(ids) or args.all else 1


def _print_dead(items, as_json: bool) -> int:
    if as_json:
        for item in items:
            print(item.model_dump_json())
        return 0
    if not items:
        print("the dead-letter queue is empty")
        return 0
    print(f"{'item':<34}{'attempts':<10}{'died':<25}error")
    for i in items:
        error = " ".join((i.last_error or "").split())
        print(f"{i.id:<34}{i.attempts:<10}{_when(i.updated):<25}"
              f"{error[:80] + ('...' if len(error) > 80 else '')}")
    return 0


def _total(view: dict) -> int:
    return sum(view["counts"].values())


def _ended(view: dict) -> int:
    return sum(view["counts"].get(s, 0) for s in ENDED)


def _counts(counts: dict, states=None, zeros: bool = False) -> str:
    states = states or counts
    return ", ".join(f"{counts.get(s, 0)} {s}" for s in states if zeros or counts.get(s, 0))


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

"""`imagegen templates list|show|validate|approve`: the style library (`styles_dir`).
Approving writes the approval (who, when, the content's sha256) into the version's
file, for review like any change: from then on that content is immutable."""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path

from .common import settings as settings_of


def add_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("templates", help="the style library: list, show, validate, approve")
    tsub = t.add_subparsers(dest="templates_command", required=True)
    for name, text in (("list", "every template version and its state"),
                       ("validate", "check every file (or the files given); exit 1 if bad")):
        p = tsub.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, help="the library (default: styles_dir)")
        if name == "validate":
            p.add_argument("files", nargs="*", type=Path)
    show = tsub.add_parser("show", help="one version (ID for the newest, or ID@VERSION)")
    show.add_argument("ref")
    show.add_argument("--dir", type=Path)
    ap = tsub.add_parser("approve", help="approve ID@VERSION: record who and when, pin its "
                         "content")
    ap.add_argument("ref")
    ap.add_argument("--by", required=True, help="who approves (recorded)")
    ap.add_argument("--dir", type=Path)
    return t


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..templates.library import load_library, parse_template, template_files

    directory = args.dir or settings_of(args).styles_dir
    if args.templates_command == "validate":
        files = args.files or template_files(directory)
        bad = 0
        for path in files:
            try:
                parse_template(Path(path).read_text(encoding="utf-8"), str(path))
            except (ConfigError, OSError) as e:
                bad += 1
                print(getattr(e, "message", str(e)), file=sys.stderr)
        if not args.files:
            try:
                load_library(directory)  # what only the whole library shows
            except ConfigError as e:
                bad += 1
                print(e.message, file=sys.stderr)
        print(f"{len(files)} template file(s) checked: {bad or 'no'} problem(s)")
        return 1 if bad else 0
    library = load_library(directory)
    if args.templates_command == "list":
        print(f"{'template':<20}{'status':<28}{'kind':<14}{'tiers':<14}owner")
        for t in library.all():
            state = t.status + (f" until {t.deprecated_on}" if t.deprecated_on else "")
            print(f"{t.ref:<20}{state:<28}{t.kind:<14}{','.join(t.tiers):<14}{t.owner}")
        return 0
    tid, _, version = args.ref.partition("@")
    versions = library.by_id.get(tid, {})
    t = versions.get(int(version)) if version.isdigit() else (
        list(versions.values())[-1] if versions and not version else None)
    if t is None:
        print(f"error: no template {args.ref} in {directory}", file=sys.stderr)
        return 2
    if args.templates_command == "show":
        import yaml

        print(yaml.safe_dump(t.model_dump(mode="json", exclude_none=True), sort_keys=False),
              end="")
        return 0
    return _approve(t, directory, args.by)


def _approve(t, directory: Path, by: str) -> int:
    from ..templates.library import parse_template, template_files

    path = next((p for p in template_files(directory)
                 if parse_template(p.read_text(encoding="utf-8"), str(p)).ref == t.ref), None)
    if t.status != "draft":
        print(f"{t.ref} is already {t.status} (approved by {t.approved.by} at "
              f"{t.approved.at:%Y-%m-%d %H:%M}Z); change it as a new version", file=sys.stderr)
        return 1
    import yaml

    at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    text = path.read_bytes().decode("utf-8")
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    status = [i for i, line in enumerate(lines) if re.match(r"status\s*:", line)]
    if len(status) > 1 or any(re.match(r"approved\s*:", line) for line in lines):
        print(f"error: {path.name} has {len(status)} status lines or an approval already; "
              "fix it by hand", file=sys.stderr)
        return 1
    # Edit the text, not a re-dump: the file keeps its comments and layout.
    if status:
        lines[status[0]] = "status: approved"
    else:
        lines.append("status: approved")
    block = yaml.safe_dump({"approved": {"by": by, "at": at.isoformat(),
                                         "sha256": t.content_sha256()}}, sort_keys=False)
    text = newline.join([*lines, *block.splitlines()]) + newline
    parse_template(text, str(path))  # the result must load, approval and all
    path.write_bytes(text.encode("utf-8"))
    print(f"approved {t.ref} ({path.name}) by {by} at {at.isoformat()}")
    return 0

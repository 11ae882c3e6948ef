"""`imagegen models ...`: build, list, verify, hash and fetch models.lock entries."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ImagegenError
from ..lockfile import HubSource, Lock, ModelEntry, hash_tree, load_lock, verify
from .common import settings as settings_of


def add_parser(sub) -> argparse.ArgumentParser:
    m = sub.add_parser("models", help="build, list, verify, hash or fetch models.lock entries")
    msub = m.add_subparsers(dest="models_command", required=True)
    mb = msub.add_parser("build", help="build the builtin tiny models (deterministic)")
    mb.add_argument("--force", action="store_true", help="rebuild even if present")
    msub.add_parser("list", help="every revision with its source, licence and state")
    msub.add_parser("verify", help="check every file's sha256 against the lock")
    mh = msub.add_parser("hash", help="print a [models.NAME.files] table for a directory")
    mh.add_argument("name")
    mh.add_argument("directory", type=Path)
    mf = msub.add_parser("fetch", help="download hub entries at their pinned commit")
    mf.add_argument("names", nargs="*")
    return m


def _state(entry: ModelEntry, model_dir: Path) -> str:
    root = entry.local_dir(model_dir)
    if not root.exists():
        return "absent"
    try:
        verify(entry, root)
    except ImagegenError as e:
        return f"BAD: {e.message}"
    return "verified"


def _table(lock: Lock, model_dir: Path) -> list[list[str]]:
    rows = [["name", "revision", "source", "pipeline", "dtype", "licence", "commercial", "state"]]
    for e in lock.models.values():
        src = e.source
        detail = {"builtin": "recipe", "hub": "repo", "path": "path"}[src.kind]
        where = f"{src.kind}:{getattr(src, detail)}"
        rows.append([e.name, e.revision[:12], where, e.pipeline, e.dtype, e.license,
                     e.commercial_use, _state(e, model_dir)])
    return rows


def _print(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def fetch(entry: ModelEntry, model_dir: Path) -> Path:
    """Download a hub entry at its pinned commit, only its locked files, then verify."""
    from huggingface_hub import snapshot_download

    assert isinstance(entry.source, HubSource)
    dest = entry.local_dir(model_dir)
    snapshot_download(
        entry.source.repo, revision=entry.source.revision, local_dir=dest,
        allow_patterns=sorted(entry.files),
    )
    verify(entry, dest)
    return dest


def run(args: argparse.Namespace) -> int:
    cmd = args.models_command
    if cmd == "hash":
        files = hash_tree(args.directory)
        print(f"[models.{args.name}.files]")
        for rel, digest in files.items():
            print(f'"{rel}" = "{digest}"')
        return 0
    settings = settings_of(args)
    lock = load_lock(settings.lock_file)
    if cmd == "build":
        from ..tinymodels import build_missing

        built = build_missing(settings.lock_file, settings.model_dir, force=args.force)
        print(f"built {len(built)} model(s) into {settings.model_dir}" if built
              else "every builtin model is already built")
        return 0
    if cmd == "list":
        _print(_table(lock, settings.model_dir))
        return 0
    if cmd == "verify":
        bad = 0
        for e in lock.models.values():
            state = _state(e, settings.model_dir)
            bad += state != "verified"
            print(f"{e.name}: {state}")
        return 1 if bad else 0
    if cmd == "fetch":
        names = args.names or [n for n, e in lock.models.items() if isinstance(e.source, HubSource)]
        for name in names:
            entry = lock.get(name)
            if not isinstance(entry.source, HubSource):
                print(f"{name}: not a hub entry", file=sys.stderr)
                return 2
            print(f"{name}: {fetch(entry, settings.model_dir)}")
        return 0
    raise AssertionError(cmd)

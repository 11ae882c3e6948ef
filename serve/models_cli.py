"""`imagegen models ...`: build, list, verify, hash and fetch models.lock entries."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from .config import Settings
from .errors import ImagegenError, ModelVerificationError
from .lockfile import BuiltinSource, HubSource, Lock, ModelEntry, hash_tree, load_lock, verify


def build_entry(entry: ModelEntry, model_dir: Path, *, force: bool = False) -> Path:
    """Build one builtin entry into its locked directory; verify it matches the lock."""
    from .tinymodels import build

    assert isinstance(entry.source, BuiltinSource)
    dest = entry.local_dir(model_dir)
    if dest.exists() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        out = Path(tmp) / "model"
        build(entry.source.recipe, entry.source.seed, out)
        try:
            verify(entry, out)
        except ModelVerificationError as e:
            raise ModelVerificationError(
                f"{e.message}. The builder no longer reproduces the lock: pinned torch/"
                "diffusers/transformers changed? Rebuild and re-hash with "
                f"`imagegen models hash {entry.name} DIR`"
            ) from None
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)  # atomic on one filesystem: no half-built model is ever visible
    return dest


def build_missing(settings: Settings, *, force: bool = False) -> list[str]:
    from tqdm import tqdm

    lock = load_lock(settings.lock_file)
    todo = [
        e for e in lock.models.values()
        if isinstance(e.source, BuiltinSource) and (force or not e.local_dir(settings.model_dir).exists())
    ]
    for entry in tqdm(todo, desc="building tiny models", unit="model", disable=not todo):
        build_entry(entry, settings.model_dir, force=force)
    return [e.name for e in todo]


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


def run(args: argparse.Namespace, settings: Settings) -> int:
    cmd = args.models_command
    if cmd == "hash":
        files = hash_tree(args.directory)
        print(f"[models.{args.name}.files]")
        for rel, digest in files.items():
            print(f'"{rel}" = "{digest}"')
        return 0
    lock = load_lock(settings.lock_file)
    if cmd == "build":
        built = build_missing(settings, force=args.force)
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

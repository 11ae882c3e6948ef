"""What every verb shares: settings from the global and the verb's own flags."""

from __future__ import annotations

import argparse

from ..config import Settings, load_settings

# Verb flags that are Settings fields (None when not given: the env or file decides).
_SETTING_FLAGS = ("host", "port", "grpc_port", "metrics_port", "engine", "threads")


def settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        getattr(args, "config", None),
        **{name: getattr(args, name, None) for name in _SETTING_FLAGS},
    )


def api_key(args: argparse.Namespace, settings: Settings) -> str | None:
    """--api-key, else IMAGEGEN_API_KEY, else the local development key file."""
    import os

    from ..quotas.keys import dev_key_file

    if key := getattr(args, "api_key", None) or os.environ.get("IMAGEGEN_API_KEY"):
        return key
    path = dev_key_file(settings.state_url)
    return path.read_text().strip() if path is not None and path.exists() else None


def add_api_key_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", help="default: $IMAGEGEN_API_KEY, else the local development "
                   "key `imagegen serve` made")

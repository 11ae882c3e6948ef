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

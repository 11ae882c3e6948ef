"""`imagegen routing show|validate`: the routing document where it lives (the
settings' file, or with --kube the ConfigMap through the Kubernetes API), and
what a running service applies. `Document` is shared with `imagegen fallback`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..config import Settings
from ..errors import ConfigError
from ..lockfile import load_lock
from ..routing import RoutingTable, parse_routing, parse_routing_text
from .common import settings as settings_of


def add_kube_flags(p: argparse.ArgumentParser) -> None:
    k = p.add_argument_group("the ConfigMap through the Kubernetes API (--kube)")
    k.add_argument("--kube", action="store_true",
                   help="read and patch the ConfigMap instead of the routing file")
    k.add_argument("--namespace", help="default: settings' routing_namespace, else the pod's")
    k.add_argument("--configmap", help="default: settings' routing_configmap, else "
                   "imagegen-routing")
    k.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config (in a pod: "
                   "its service account)")
    k.add_argument("--context", help="kubeconfig context")


class Document:
    """The routing document in its store: read, validate, write back."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        self.settings = settings
        self.lock = load_lock(settings.lock_file)
        self.kube = getattr(args, "kube", False)
        self.key = settings.routing_key
        if self.kube:
            from ..routing.kube import api_client, pod_namespace

            self.api = _kube(api_client, args.kubeconfig or settings.kubeconfig, args.context)
            self.namespace = args.namespace or settings.routing_namespace or pod_namespace()
            self.name = args.configmap or settings.routing_configmap or "imagegen-routing"
            self.where = f"configmap {self.namespace}/{self.name} key {self.key}"
        else:
            self.path = Path(settings.routing_file)
            self.where = f"file {self.path}"

    def read(self) -> RoutingTable:
        if self.kube:
            from ..routing.kube import read_configmap

            # The version read: write() patches only if nobody changed it since.
            data, self.resource_version = _kube(read_configmap, self.api, self.namespace,
                                                self.name)
            if self.key not in data:
                raise ConfigError(f"{self.where}: no such key")
            text = data[self.key]
        else:
            try:
                text = self.path.read_text()
            except OSError as e:
                raise ConfigError(f"cannot read {self.where}: {e}") from None
        return parse_routing_text(text, self.lock, origin=self.where)

    def write(self, doc: dict[str, Any]) -> RoutingTable:
        """Validate, then replace atomically: every ingress sees the old or the new
        document, never half of one. Comments are not kept."""
        table = parse_routing(doc, self.lock, origin=self.where)
        text = yaml.safe_dump(table.model_dump(mode="json", exclude_defaults=True),
                              sort_keys=False)
        if self.kube:
            from ..routing.kube import patch_configmap

            _kube(patch_configmap, self.api, self.namespace, self.name, {self.key: text},
                  resource_version=self.resource_version)
            return table
        try:
            mode = self.path.stat().st_mode & 0o777
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".routing-")
        except OSError as e:
            raise ConfigError(f"cannot write {self.where}: {e}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)  # mkstemp makes 0600: the ingress may run as another user
            os.replace(tmp, self.path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise ConfigError(f"cannot write {self.where}: {e}") from None
        return table


def _kube(call, *args, **kwargs):
    """A Kubernetes API call; its KubeError as the CLI's one-line ConfigError."""
    from ..routing.kube import KubeError

    try:
        return call(*args, **kwargs)
    except KubeError as e:
        if getattr(e.__cause__, "status", None) == 409:  # the patch's resourceVersion is old
            raise ConfigError("the ConfigMap changed since it was read (someone else edited "
                              "it); run the command again") from None
        raise ConfigError(str(e)) from None


def add_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("routing", help="show or validate the routing document")
    rsub = r.add_subparsers(dest="routing_command", required=True)
    show = rsub.add_parser("show", help="the document, and with --url what a service applies")
    show.add_argument("--url", help="also ask this running service (GET /v1/routing)")
    add_kube_flags(show)
    v = rsub.add_parser("validate", help="check a document against models.lock (exit 1 if bad)")
    v.add_argument("file", type=Path)
    return r


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    try:
        if args.routing_command == "validate":
            table = parse_routing_text(_read(args.file), load_lock(settings.lock_file),
                                       origin=str(args.file))
            print(f"ok: {args.file} version {table.version}, tiers "
                  f"{', '.join(sorted(table.tiers))}")
            return 0
        doc = Document(args, settings)
        table = doc.read()
        print(f"# {doc.where}, version {table.version}")
        print(yaml.safe_dump(table.model_dump(mode="json", exclude_defaults=True),
                             sort_keys=False), end="")
        if args.url:
            return _show_applied(args.url)
        return 0
    except ConfigError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _show_applied(url: str) -> int:
    import httpx

    try:
        live = httpx.get(f"{url.rstrip('/')}/v1/routing", timeout=10).json()
    except (httpx.HTTPError, ValueError) as e:
        print(f"error: cannot ask {url}: {e}", file=sys.stderr)
        return 2
    print(f"\n# {url} applies version {live['version']} from {live['origin']}"
          + (f"; LAST DOCUMENT REFUSED: {live['error']}" if live["error"] else "")
          + (f"; SOURCE UNREACHABLE: {live['source_error']}" if live["source_error"] else ""))
    for tier, t in live["tiers"].items():
        state = "DISABLED" if t["disabled"] else ("ON FALLBACK" if t["on_fallback"] else "primary")
        print(f"  {tier:<10} {state:<12} primary {t['primary']}, fallbacks "
              f"{', '.join(t['fallbacks']) or '-'}{'' if t['ready'] else '  (nothing ready)'}")
    for model, r in live["revisions"].items():
        print(f"  {model:<16} {'ready' if r['ready'] else 'NOT READY'}, breaker {r['breaker']}"
              + (f" ({r['reason']})" if r["reason"] else ""))
    return 0

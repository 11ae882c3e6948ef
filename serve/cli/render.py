"""`imagegen render serve-config|k8s`: the cluster's generated inputs, from models.lock,
the autoscaling policy, the routing document and the settings (serve/deploy.py).

`render k8s` writes the one generated file of an overlay, which is committed (a
test checks it is fresh, as the protobuf stubs are checked); with `--image` and
`-o DIR` it writes a deployable kustomization over that overlay, pinned by digest."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ..config import ROOT, Settings, load_settings
from ..errors import ConfigError
from .common import settings as settings_of

K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
PATCH = Path("generated") / "rayservice-patch.yaml"


def add_parser(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("render", help="the RayService serve config and the Kubernetes "
                       "manifests' generated part (README § Deploying to Kubernetes)")
    rsub = r.add_subparsers(dest="render_command", required=True)
    sc = rsub.add_parser("serve-config", help="the Serve config (RayService serveConfigV2), "
                         "validated with Ray's ServeDeploySchema")
    sc.add_argument("--policy", type=Path, help="autoscaling policy (default: settings)")
    sc.add_argument("--lock", type=Path, help="models.lock (default: settings)")
    sc.add_argument("-o", "--output", type=Path, help="write it here instead of stdout")
    k = rsub.add_parser("k8s", help="write k8s/overlays/OVERLAY/generated/ from the "
                        "overlay's render.yaml inputs and settings.yaml ConfigMap")
    k.add_argument("--overlay", choices=OVERLAYS, required=True)
    k.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when the committed generated file is stale")
    k.add_argument("--image", help="REPOSITORY@sha256:DIGEST to deploy (with -o)")
    k.add_argument("-o", "--output", type=Path, metavar="DIR",
                   help="with --image: write DIR/kustomization.yaml, the overlay with the "
                        "image pinned (kubectl apply -k DIR)")
    return r


def run(args: argparse.Namespace) -> int:
    try:
        if args.render_command == "serve-config":
            return _serve_config(args)
        return _k8s(args)
    except (ValueError, OSError) as e:  # a bad policy, lock, inputs file or image
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2


def _serve_config(args) -> int:
    from .. import deploy

    settings = settings_of(args)
    if args.lock:
        settings = settings.model_copy(update={"lock_file": args.lock})
    doc = _build(settings, args.policy or settings.policy_file, explicit_policy=bool(args.policy))
    _write(args.output, deploy.dump(doc))
    return 0


def _build(settings: Settings, policy_path: Path, explicit_policy: bool = True) -> dict:
    """The validated serve config for these settings and this policy."""
    from autoscaling.policies import load_policy

    from .. import deploy
    from ..lockfile import load_lock
    from ..routing import load_routing

    lock = load_lock(settings.lock_file)
    routing = load_routing(settings.routing_file, lock)
    args = {}
    if explicit_policy:
        # As `imagegen capacity serve-config --policy`: the replicas build their
        # deployments from this same policy; inside the checkout the path stays
        # relative (a RayService's working_dir).
        path = policy_path.resolve()
        args["policy_file"] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    doc = deploy.serve_config(load_policy(policy_path), lock, routing, settings, args)
    deploy.validate_serve_config(doc)
    return doc


def _write(path: Path | None, text: str) -> None:
    if path is None:
        print(text, end="")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}", file=sys.stderr)


def overlay_files(overlay: str, k8s: Path = K8S) -> dict[Path, str]:
    """The generated files of k8s/overlays/OVERLAY (paths relative to it): the
    RayService patch and the routing ConfigMap, from the overlay's render.yaml
    (policy, lock, routing) and settings.yaml (its settings ConfigMap)."""
    import yaml

    from autoscaling.policies import load_policy

    from .. import deploy

    where = k8s / "overlays" / overlay
    inputs = yaml.safe_load((where / "render.yaml").read_text())
    configmap = yaml.safe_load((where / "settings.yaml").read_text())
    paths = {k: ROOT / inputs[k] for k in ("policy", "lock", "routing")}
    with _only_env(configmap.get("data") or {}):
        settings = load_settings(lock_file=paths["lock"], routing_file=paths["routing"])
    doc = _build(settings, paths["policy"])
    header = deploy.GENERATED_HEADER.format(
        overlay=overlay, inputs=f"k8s/overlays/{overlay}/render.yaml and settings.yaml")
    routing = deploy.routing_configmap(settings.routing_configmap or "imagegen-routing",
                                       settings.routing_key, paths["routing"].read_text())
    return {
        PATCH: header + deploy.dump(deploy.rayservice_patch(doc, load_policy(paths["policy"]))),
        PATCH.parent / "routing-configmap.yaml": header + deploy.dump(routing),
    }


@contextmanager
def _only_env(env: dict[str, str]):
    """The settings the pods get (their ConfigMap), and none of this shell's IMAGEGEN_*."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("IMAGEGEN_")}
    for k in saved:
        del os.environ[k]
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _k8s(args) -> int:
    from .. import deploy

    if bool(args.image) != bool(args.output):
        raise ValueError("--image and -o DIR go together: the deployable overlay, pinned "
                         "by digest")
    where = K8S / "overlays" / args.overlay
    files = overlay_files(args.overlay)
    stale = [p for p, text in files.items()
             if not (where / p).exists() or (where / p).read_text() != text]
    if not (args.check or args.image):
        for path, text in files.items():
            _write(where / path, text)
        return 0
    if stale:
        print(f"error: {', '.join(str(where / p) for p in stale)} stale: run `imagegen "
              f"render k8s --overlay {args.overlay}`", file=sys.stderr)
        return 1
    if args.check:
        print(f"{where / PATCH.parent} is fresh")
        return 0
    out = args.output.resolve()
    kust = deploy.deploy_kustomization(os.path.relpath(where, out), args.image)
    _write(out / "kustomization.yaml", deploy.dump(kust))
    return 0

"""`imagegen render`: the serve config, the overlays' generated files (committed and
fresh) and the deployable kustomization pinned by digest."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from deploy_support import OVERLAYS, ROOT, build

from serve.cli.main import main
from serve.cli.render import overlay_files

GPU_POLICY = "autoscaling/policy-gpu.yaml"
DIGEST = "sha256:" + "ab" * 32


def _render(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["render", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_serve_config_is_capacitys_application_plus_pools(capsys):
    """The application entry is `imagegen capacity serve-config`'s, unchanged; render
    adds only the deployments' pools."""
    assert main(["capacity", "--policy", GPU_POLICY, "serve-config"]) == 0
    capacity = yaml.safe_load(capsys.readouterr().out)
    rc, out, _ = _render(capsys, "serve-config", "--policy", GPU_POLICY)
    assert rc == 0
    doc = yaml.safe_load(out)
    app = doc["applications"][0]
    deployments = {d["name"]: d["ray_actor_options"] for d in app.pop("deployments")}
    assert doc == capacity
    assert deployments["image-safety"]["num_gpus"] == 0  # the classifier is on CPU
    assert deployments["image-safety"]["label_selector"] == {"imagegen.io/pool": "cpu"}
    assert deployments["Ingress"]["num_gpus"] == 0
    models = {n: o for n, o in deployments.items() if n not in ("Ingress", "image-safety")}
    assert models and all(o["num_gpus"] == 1 for o in models.values())
    assert all(o["label_selector"] == {"imagegen.io/pool": "models"} for o in models.values())


def test_serve_config_to_file_with_lock(capsys, tmp_path):
    out = tmp_path / "serve.yaml"
    rc, stdout, _ = _render(capsys, "serve-config", "--lock", str(ROOT / "models.lock"),
                            "-o", str(out))
    assert rc == 0 and stdout == ""
    assert yaml.safe_load(out.read_text())["applications"][0]["import_path"] == \
        "serve.app:build_app"


def test_a_bad_policy_is_one_line(capsys, tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("defaults: {}\n")
    rc, _, err = _render(capsys, "serve-config", "--policy", str(bad))
    assert rc == 2 and err.startswith("error: invalid autoscaling policy")
    assert "Traceback" not in err


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_committed_generated_files_are_fresh(overlay):
    where = ROOT / "k8s" / "overlays" / overlay
    for path, text in overlay_files(overlay).items():
        assert (where / path).read_text() == text, (
            f"{where / path} is stale: run `imagegen render k8s --overlay {overlay}`")


def test_check_flag_in_a_subprocess():
    run = subprocess.run([sys.executable, "-m", "serve.cli", "render", "k8s", "--overlay",
                          "prod", "--check"], check=False, cwd=ROOT, capture_output=True,
                         text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("image", [
    "registry.example/imagegen:1.2.3",  # a tag alone
    "registry.example/imagegen",
    "registry.example/imagegen@sha256:1234",
    "registry.example/imagegen@sha256:" + "0" * 64,  # the placeholder
])
def test_image_must_be_pinned_by_digest(capsys, tmp_path, image):
    rc, _, err = _render(capsys, "k8s", "--overlay", "prod", "--image", image,
                         "-o", str(tmp_path))
    assert rc == 2 and "--image" in err
    assert not (tmp_path / "kustomization.yaml").exists()


def test_image_without_output_is_refused(capsys):
    rc, _, err = _render(capsys, "k8s", "--overlay", "prod", "--image",
                         f"registry.example/imagegen@{DIGEST}")
    assert rc == 2 and "-o DIR" in err


def test_deployable_overlay_pins_every_container(capsys, tmp_path, kubectl):
    rc, _, err = _render(capsys, "k8s", "--overlay", "prod", "--image",
                         f"registry.example:5000/team/imagegen@{DIGEST}", "-o", str(tmp_path))
    assert rc == 0, err
    images = _images(build(kubectl, tmp_path))
    assert images == {f"registry.example:5000/team/imagegen@{DIGEST}"}


def test_committed_overlays_name_the_image_symbolically(rendered):
    """Nothing deploys by tag: until `--image` pins it, the image is the bare name."""
    for objects in rendered.values():
        assert _images(objects) == {"imagegen"}


def _images(objects) -> set[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("containers", "initContainers"):
                    found.update(c["image"] for c in v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(objects)
    return found

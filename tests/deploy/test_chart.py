"""charts/imagegen against k8s/: for each overlay, `helm template` with the overlay's
values files renders the same objects as `kubectl kustomize` of that overlay pinned
to the same image (serve.deploy.deploy_kustomization), object by object; `helm lint
--strict`; the image must be pinned by digest; the generated values are fresh."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from deploy_support import OVERLAYS, ROOT, build

from serve import deploy
from serve.cli import render

CHART = ROOT / "charts" / "imagegen"
REPO = "registry.example:5000/team/imagegen"
DIGEST = "sha256:" + "ab" * 32
NAMESPACES = {"dev": "imagegen-dev", "prod": "imagegen"}


def _values_files(overlay: str) -> list[str]:
    return ["-f", str(CHART / f"values-{overlay}.yaml"),
            "-f", str(CHART / "generated" / f"values-{overlay}.yaml")]


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], check=False, capture_output=True, text=True,
                          timeout=120)


def _template(helm: str, overlay: str, *sets: str) -> subprocess.CompletedProcess:
    return _helm(helm, "template", "imagegen", str(CHART), "--namespace",
                 NAMESPACES[overlay], *_values_files(overlay), *sets)


def _pinned(*extra: str) -> list[str]:
    return ["--set", f"image.repository={REPO}", "--set", f"image.digest={DIGEST}", *extra]


def _by_key(objects) -> dict[tuple[str, str, str], dict]:
    keyed = {(o["apiVersion"], o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects), "two objects with the same kind and name"
    return keyed


@pytest.fixture(scope="session")
def kustomized(kubectl, tmp_path_factory) -> dict[str, dict]:
    """Each overlay as a deploy would apply it: pinned to REPO@DIGEST by kustomize."""
    built = {}
    for overlay in OVERLAYS:
        out = tmp_path_factory.mktemp(f"deploy-{overlay}")
        kust = deploy.deploy_kustomization(
            os.path.relpath(ROOT / "k8s" / "overlays" / overlay, out), f"{REPO}@{DIGEST}")
        (out / "kustomization.yaml").write_text(deploy.dump(kust))
        built[overlay] = _by_key(build(kubectl, out))
    return built


def _diff(got, want, path: str = "") -> list[str]:
    """Where two objects differ, as paths (the chart's value, then the overlay's)."""
    if isinstance(got, dict) and isinstance(want, dict):
        return [d for k in sorted(set(got) | set(want), key=str)
                for d in _diff(got.get(k), want.get(k), f"{path}/{k}")]
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _diff(g, w, f"{path}/{i}")]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_generated_values_are_fresh(overlay):
    path = CHART / "generated" / f"values-{overlay}.yaml"
    assert path.read_text() == render.generated(overlay)[path], (
        f"run `imagegen render k8s --overlay {overlay}`")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_chart_renders_the_overlays_objects(helm, kustomized, overlay):
    """Same kinds, names, labels and specs: nothing normalised (the chart emits the
    base's kustomize labels and the overlay's namespace, Release.Namespace)."""
    run = _template(helm, overlay, *_pinned())
    assert run.returncode == 0, run.stderr
    charted = _by_key([d for d in yaml.safe_load_all(run.stdout) if d])
    expected = kustomized[overlay]
    assert sorted(charted) == sorted(expected)
    for key, obj in expected.items():
        assert charted[key] == obj, (
            f"{key} differs from k8s/overlays/{overlay}: {_diff(charted[key], obj)}")


def test_generated_part_is_the_overlays(helm, kustomized):
    """The node cap and the serve config reach the RayService from generated values."""
    values = render.chart_values("prod", render.overlay_files("prod"))
    rs = kustomized["prod"][("ray.io/v1", "RayService", "imagegen")]
    models = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][deploy.MODEL_GROUP_INDEX]
    assert models["groupName"] == "models" and models["maxReplicas"] == values["nodeCap"]
    assert rs["spec"]["serveConfigV2"] == values["serveConfig"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_helm_lint_strict(helm, overlay):
    run = _helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACES[overlay],
                *_values_files(overlay), *_pinned())
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(("sets", "message"), [
    (["--set", f"image.repository={REPO}", "--set", "image.tag=1.2.3"],
     "image.digest is required: the image is pinned by digest"),
    (["--set", f"image.repository={REPO}:1.2.3", "--set", f"image.digest={DIGEST}"],
     "give the repository alone"),
    (["--set", f"image.repository={REPO}", "--set", "image.digest=sha256:1234"],
     "does not match pattern"),  # values.schema.json, before any template
    (["--set", f"image.repository={REPO}", "--set", "image.digest=sha256:" + "0" * 64],
     "the all-zero digest is a placeholder"),
    (["--set", f"image.digest={DIGEST}"], "image.repository is required"),
])
def test_image_must_be_pinned_by_digest(helm, sets, message):
    run = _template(helm, "prod", *sets)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr


def test_generated_part_is_required(helm):
    run = _helm(helm, "template", "imagegen", str(CHART), "-f",
                str(CHART / "values-prod.yaml"), *_pinned())
    assert run.returncode != 0 and "imagegen render k8s" in run.stderr, run.stderr


def test_schema_refuses_unknown_values(helm):
    run = _template(helm, "prod", *_pinned("--set", "workerGroups.models.maxReplicas=9"))
    assert run.returncode != 0 and "maxReplicas" in run.stderr, run.stderr


def test_every_value_is_documented():
    """KubeRay style: a `# --` comment on every key of values.yaml."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and \
                not lines[j].strip().startswith("# --"):
            j -= 1
        documented = j >= 0 and lines[j].strip().startswith("# --") and \
            len(lines[j]) - len(lines[j].lstrip()) == indent
        if not documented and not _inside_documented_map(lines, i, indent):
            undocumented.append(stripped)
    assert not undocumented


def _inside_documented_map(lines: list[str], i: int, indent: int) -> bool:
    """A key of a documented map of plain data (resources, selectors, contexts), or of
    an item of a documented list."""
    for j in range(i - 1, -1, -1):
        line = lines[j]
        if line.strip() and not line.strip().startswith("#"):
            parent_indent = len(line) - len(line.lstrip())
            if parent_indent < indent:
                return line.strip().startswith("- ") or line.strip().split(":")[0] in DATA_MAPS
    return False


# Values whose keys are Kubernetes' or Ray's, documented where the map is.
DATA_MAPS = {"resources", "requests", "limits", "podSecurityContext", "securityContext",
             "capabilities", "seccompProfile", "rayStartParams", "nodeSelector",
             "clientNamespaceSelector", "namespaceSelector", "podSelector",
             "operatorPodSelector", "redisPodSelector", "labels",
             "dashboardLabels"}

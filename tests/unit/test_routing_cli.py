"""`imagegen routing` and `imagegen fallback` on a file and, with --kube, on a
ConfigMap through the in-test Kubernetes API server (tests/fakes/kube_api.py)."""

from __future__ import annotations

import argparse
import stat

import pytest
import yaml
from kube_api import FakeKubeAPI

from serve.cli.main import main
from serve.cli.routing import Document
from serve.config import ROOT, load_settings
from serve.errors import ConfigError

DOC = {"version": 4, "tiers": {"draft": {"model": "tiny-draft", "fallbacks": ["tiny-spare"]},
                               "final": {"model": "tiny-final"}}}


@pytest.fixture
def routing_file(tmp_path, monkeypatch):
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(DOC))
    path.chmod(0o644)
    monkeypatch.setenv("IMAGEGEN_ROUTING_FILE", str(path))
    return path


def test_fallback_enable_and_disable_edit_the_file_keeping_its_mode(routing_file, capsys):
    assert main(["fallback", "enable", "draft", "--force"]) == 0
    doc = yaml.safe_load(routing_file.read_text())
    assert doc["version"] == 5 and doc["tiers"]["draft"]["force_fallback"] is True
    assert stat.S_IMODE(routing_file.stat().st_mode) == 0o644
    assert "now served by tiny-spare" in capsys.readouterr().out
    assert main(["fallback", "disable", "draft"]) == 0
    doc = yaml.safe_load(routing_file.read_text())
    assert doc["version"] == 6 and "force_fallback" not in doc["tiers"]["draft"]


def test_enable_refuses_without_a_fallback_or_a_reachable_service(routing_file, capsys):
    assert main(["fallback", "enable", "final", "--force"]) == 1
    assert "has no fallback" in capsys.readouterr().err
    assert main(["fallback", "enable", "draft", "--url", "http://127.0.0.1:9"]) == 1
    assert "--force flips without asking" in capsys.readouterr().err
    assert yaml.safe_load(routing_file.read_text())["version"] == 4  # unchanged


def test_validate_names_the_bad_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    # tiny-draft accepts at most 16 steps, tiny-final's primary contract is 32.
    bad.write_text("tiers: {final: {model: tiny-final, fallbacks: [tiny-draft]}}\n")
    assert main(["routing", "validate", str(bad)]) == 1
    assert "tiny-draft accepts less than tiny-final (max_steps 16 < 32)" in capsys.readouterr().err
    assert main(["routing", "validate", str(ROOT / "serve" / "routing.yaml")]) == 0


@pytest.fixture
def kube(tmp_path):
    with FakeKubeAPI(token="t") as api:
        api.set("ns", "imagegen-routing", {"routing.yaml": yaml.safe_dump(DOC)})
        api.kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
        yield api


def _kube_flags(api) -> list[str]:
    return ["--kube", "--namespace", "ns", "--kubeconfig", api.kubeconfig]


def test_fallback_enable_patches_the_configmap(kube, capsys):
    assert main(["fallback", "enable", "draft", "--force", *_kube_flags(kube)]) == 0
    doc = yaml.safe_load(kube.get("ns", "imagegen-routing")["data"]["routing.yaml"])
    assert doc["version"] == 5 and doc["tiers"]["draft"]["force_fallback"] is True
    assert "configmap ns/imagegen-routing" in capsys.readouterr().out
    assert main(["routing", "show", *_kube_flags(kube)]) == 0
    assert "version 5" in capsys.readouterr().out


def test_a_concurrent_edit_is_not_overwritten(kube):
    args = argparse.Namespace(kube=True, namespace="ns", configmap=None,
                              kubeconfig=kube.kubeconfig, context=None)
    doc = Document(args, load_settings())
    table = doc.read()
    other = DOC | {"version": 9}
    kube.set("ns", "imagegen-routing", {"routing.yaml": yaml.safe_dump(other)})  # meanwhile
    with pytest.raises(ConfigError, match="changed since it was read"):
        doc.write(table.model_dump(mode="json") | {"version": table.version + 1})
    assert yaml.safe_load(kube.get("ns", "imagegen-routing")["data"]["routing.yaml"])[
        "version"] == 9


def test_an_unreadable_kubeconfig_is_one_line(capsys):
    assert main(["fallback", "disable", "draft", "--kube", "--kubeconfig", "/nonexistent"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load Kubernetes config") and "Traceback" not in err

"""The container image's recipe, checked without building it (no Docker daemon here):
bases pinned by digest, a non-root user and no compiler in the final stage, weights
served offline, the build context limited to what it copies, and constraints.txt
(the versions it installs) inside every range pyproject.toml declares."""

from __future__ import annotations

import re
import tomllib

import pytest
from deploy_support import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make", "cmake", "rustc", "cargo")


def _stages() -> list[str]:
    return re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]


def test_every_base_is_pinned_by_digest():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, flags=re.MULTILINE))
    for stage in _stages():
        base = stage.split()[0]
        base = args.get(base.strip("${}"), base)
        assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base), base


def test_the_final_stage_runs_offline_as_a_user_without_a_compiler():
    final = _stages()[-1]
    user = re.findall(r"^USER (\S+)$", final, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    assert "HF_HUB_OFFLINE=1" in final
    installed = " ".join(re.findall(r"apt-get install[^&]*", final))
    assert not [c for c in COMPILERS if re.search(rf"\b{re.escape(c)}\b", installed)]


def test_the_build_context_holds_what_it_copies():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines  # everything else stays out (the venv, models, state)
    kept = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, flags=re.MULTILINE):
        for src in line.split()[:-1]:
            assert src.rstrip("/") in kept, f"{src} is copied but .dockerignore leaves it out"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra, rs in
                                        project["optional-dependencies"].items()
                                        if extra != "gpu" for r in rs)]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("req", _requirements(), ids=str)
def test_constraints_satisfy_pyproject(req):
    pins = _pins()
    name = canonicalize_name(req.name)
    assert name in pins, f"{req.name} is not in constraints.txt: run `make constraints`"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt has {req.name}=={pins[name]}, outside {req.specifier}: "
        "run `make constraints`")

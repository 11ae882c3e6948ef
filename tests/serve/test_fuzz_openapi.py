"""schemathesis (its CLI, as a user runs it) against the live stack's OpenAPI
document: every route, bounded examples, valid and schema-violating requests. No
5xx (but the `broken` tier's 503), every error in its route's one envelope
(schemathesis_hooks.py), no schema-violating request accepted. /readyz is left out:
the session stack routes that `broken` tier on purpose, so its 503 is the contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

pytestmark = pytest.mark.serve
HERE = Path(__file__).resolve().parent


def test_the_live_openapi_contract(stack, tmp_path, api_key):
    cli = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(cli), "--no-color", "run", f"{stack}/openapi.json",
         "--checks", "no_server_error,negative_data_rejection,one_envelope",
         "--mode", "all", "--max-examples", "25", "--seed", "1", "--workers", "1",
         "--request-timeout", "30", "--exclude-path", "/readyz",
         "--header", f"Authorization: Bearer {api_key}",
         "--report", "junit", "--report-dir", str(tmp_path)],
        env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
             "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    report = ElementTree.parse(next(tmp_path.glob("junit-*.xml")))
    tested = {c.get("name") for c in report.iter("testcase")} - {"Stateful tests"}
    assert tested == {"POST /v1/images", "POST /v1/images/generations", "GET /v1/models",
                      "GET /v1/quota", "GET /v1/quota/{principal}", "GET /v1/templates",
                      "GET /v1/templates/{template}", "GET /v1/review", "GET /v1/review/{item_id}",
                      "GET /v1/review/{item_id}/images/{index}",
                      "POST /v1/review/{item_id}/decision", "POST /v1/appeals",
                      "GET /v1/images/{image_id}", "POST /v1/images/{image_id}/reroll",
                      "GET /v1/files/{path}", "POST /v1/batches", "GET /v1/batches",
                      "GET /v1/batches/{batch_id}", "POST /v1/batches/{batch_id}/cancel",
                      "GET /v1/batches/{batch_id}/results", "GET /v1/routing",
                      "GET /healthz"}, tested

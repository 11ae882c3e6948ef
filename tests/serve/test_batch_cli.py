"""`imagegen batch` as a user runs it (a subprocess) against the real stack: a JSONL
file submitted and waited for, its results written as JSON lines; a bad line named
in one line; Ctrl-C while waiting leaves the batch running, and cancel stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.serve


@pytest.fixture
def cli(stack, api_key):
    env = {**os.environ, "IMAGEGEN_API_KEY": api_key}

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serve.cli", "batch", *args,
                               "--url", stack], check=False, capture_output=True,
                              text=True, timeout=timeout, env=env)

    run.popen = lambda *args: subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "batch", *args, "--url", stack],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return run


def jsonl(path, requests: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in requests))
    return str(path)


def test_submit_wait_then_results(cli, client, tmp_path):
    tag = uuid.uuid4().hex[:6]
    file = jsonl(tmp_path / "b.jsonl", [{"prompt": f"a fox {tag}"},
                                        {"prompt": f"a heron {tag}", "n": 2},
                                        {"prompt": f"a kettle {tag}", "seed": 7}])
    run = cli("submit", file, "--wait", "--window", "3600")
    assert run.returncode == 0, run.stderr
    (batch_id,) = run.stdout.splitlines()  # the id alone: ID=$(imagegen batch submit ...)
    final = run.stderr.splitlines()[-1]
    assert final == f"{batch_id} completed: 3 succeeded, 0 dead, 0 cancelled"
    assert f"imagegen batch status {batch_id}" in run.stderr and "3/3" in run.stderr
    view = client.get(f"/v1/batches/{batch_id}").json()
    assert view["deadline"] - view["created"] == 3600  # --window went as the query

    status = cli("status", batch_id)
    assert status.returncode == 0
    assert "completed" in status.stdout and "100% (3 of 3 items ended)" in status.stdout
    assert batch_id in cli("list").stdout

    out = tmp_path / "results.jsonl"
    res = cli("results", batch_id, "-o", str(out))
    assert res.returncode == 0 and "wrote 3 results" in res.stdout
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(i["index"], i["state"]) for i in items] == [
        (0, "succeeded"), (1, "succeeded"), (2, "succeeded")]
    assert [len(i["result"]["images"]) for i in items] == [1, 2, 1]
    assert items[2]["result"]["seeds"] == [7]
    image = client.get(f"/v1/images/{items[1]['result']['images'][1]}")
    assert image.status_code == 200 and image.json()["request_id"].startswith(batch_id)
    assert cli("results", batch_id).stdout == out.read_text()  # the same to stdout


def test_a_bad_line_is_named_in_one_line(cli, client, tmp_path):
    batch_id = "cli_bad_" + uuid.uuid4().hex[:8]
    file = jsonl(tmp_path / "bad.jsonl", [{"prompt": "a fox"}, "{not json", {"prompt": "b"}])
    run = cli("submit", file, "--id", batch_id)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error 400 malformed_body: line 2:")
    assert client.get(f"/v1/batches/{batch_id}").status_code == 404  # nothing submitted
    missing = cli("status", batch_id)
    assert missing.returncode == 1
    assert missing.stderr == f"error 404 not_found: no batch {batch_id!r}\n"


def test_ctrl_c_stops_waiting_and_cancel_stops_the_batch(cli, client, tmp_path):
    tag = uuid.uuid4().hex[:6]
    # 128x128 on the final tier: seconds per item, so 30 run well past the Ctrl-C
    file = jsonl(tmp_path / "many.jsonl", [
        {"prompt": f"a lantern {tag} {i}", "tier": "final", "size": "128x128"}
        for i in range(30)])
    waiting = cli.popen("submit", file, "--wait")
    batch_id = waiting.stdout.readline().strip()
    assert batch_id.startswith("b_"), waiting.communicate(timeout=30)
    time.sleep(2)  # a poll or two
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130, err
    assert out == ""  # no final counts: it did not end
    assert f"batch {batch_id} keeps running" in err and f"imagegen batch cancel {batch_id}" in err
    assert "Traceback" not in err
    assert client.get(f"/v1/batches/{batch_id}").json()["state"] == "running"

    cancel = cli("cancel", batch_id)
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.startswith(f"{batch_id} cancelled: ")
    view = client.get(f"/v1/batches/{batch_id}").json()
    assert view["state"] == "cancelled" and view["counts"]["cancelled"] >= 20
    assert view["counts"]["pending"] == 0
    status = cli("status", batch_id)
    assert status.stdout.splitlines()[1].split() == ["state", "cancelled"]

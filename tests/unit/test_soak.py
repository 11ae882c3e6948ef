"""The soak check (`imagegen loadtest --watch`): the verdict by table, and the watch on
a real process tree that leaks files and memory on purpose."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from serve.cli.soak import Sample, Watch, verdict

MB = 2**20


def _run(*later: Sample) -> list[Sample]:
    warm = Sample(10.0, rss={1: 500 * MB, 2: 40 * MB}, files={1: 10, 2: 3},
                  sockets={1: 20, 2: 1}, objects=4.0)
    return [Sample(0.0, rss={1: 300 * MB}), warm, *later]


@pytest.mark.parametrize(("last", "problem"), [
    (Sample(60.0, rss={1: 520 * MB, 2: 41 * MB}, files={1: 11, 2: 3}, sockets={1: 22, 2: 1},
            objects=8.0), None),  # within every bound
    (Sample(60.0, rss={1: 530 * MB, 2: 40 * MB}, files={1: 10, 2: 3}, sockets={1: 20, 2: 1},
            objects=4.0), "RSS 500.0 -> 530.0 MB (+6.0% > 5%)"),
    (Sample(60.0, rss={1: 500 * MB, 2: 40 * MB}, files={1: 10, 2: 9}, sockets={1: 20, 2: 1},
            objects=4.0), "files 3 -> 9"),
    (Sample(60.0, rss={1: 500 * MB, 2: 40 * MB}, files={1: 10, 2: 3}, sockets={1: 40, 2: 1},
            objects=4.0), "sockets 20 -> 40"),
    (Sample(60.0, rss={1: 500 * MB}, files={1: 10}, sockets={1: 20}, objects=4.0),
     "serving processes ended during the soak: ray::ServeReplica:app:b (2)"),
    (Sample(60.0, rss={1: 500 * MB, 2: 40 * MB}, files={1: 10, 2: 3}, sockets={1: 20, 2: 1},
            objects=400.0), "Ray objects 4 -> 400"),
])
def test_verdict_compares_the_end_with_the_warm_up(last, problem):
    v = verdict(_run(last), {1: "a", 2: "ray::ServeReplica:app:b"}, warmup_s=5.0)
    assert v["ok"] is (problem is None)
    if problem:
        assert any(problem in p for p in v["problems"]), v["problems"]
    # the warm-up's own growth (300 -> 500 MB) is not counted
    assert {r["pid"]: r["rss_mb"][0] for r in v["processes"]}[1] == 500.0


def test_a_soak_shorter_than_its_warm_up_is_no_verdict():
    v = verdict(_run(), {}, warmup_s=30.0)
    assert not v["ok"] and "run longer" in v["problems"][0]


def test_the_watch_sees_a_real_child_leak_files_and_memory(tmp_path):
    leaker = textwrap.dedent(f"""
        import time
        held, files = [], []
        for i in range(40):
            held.append(bytearray(4 * 2**20))  # 4 MB more each step
            files.append(open({str(tmp_path)!r} + f"/f{{i}}", "w"))
            time.sleep(0.1)
        time.sleep(30)
    """)
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {leaker!r}])"
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    try:
        import psutil

        deadline = time.monotonic() + 30
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)  # two interpreter starts on a loaded box
        w = Watch(parent.pid, None, interval_s=0.5)
        w.start()
        time.sleep(4.5)
        w.stop()
    finally:
        parent.kill()
        subprocess.run(["pkill", "-f", str(tmp_path)], check=False)
    v = verdict(w.samples, w.names, warmup_s=0.0)
    assert not v["ok"]
    grew = [r for r in v["processes"] if r["files"][1] > r["files"][0] + 2]
    assert grew and grew[0]["rss_growth"] > 0.05  # the grandchild: found under the root
    assert len(v["processes"]) == 2


def test_an_idle_ray_worker_reaped_is_no_leak():
    last = Sample(60.0, rss={1: 500 * MB}, files={1: 10}, sockets={1: 20}, objects=4.0)
    v = verdict(_run(last), {1: "a", 2: "ray::IDLE"}, warmup_s=5.0)
    assert v["ok"] and v["ended_processes"] == [{"pid": 2, "name": "ray::IDLE"}]

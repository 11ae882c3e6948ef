"""`imagegen capacity`: the cap check by table, planner inputs from the policy and
models.lock, profiles recorded into a lock, and the CLI end to end (no Ray)."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import yaml

from autoscaling.capacity import ModelFacts, check, plan_inputs
from autoscaling.policies import Policy, load_policy
from serve.cli.capacity import record_profile
from serve.cli.main import main
from serve.config import ROOT
from serve.lockfile import Profile, load_lock

GPU_POLICY = ROOT / "autoscaling" / "policy-gpu.yaml"
TIERS = {"draft": "tiny-draft", "final": "tiny-final"}
VRAM = {"tiny-draft": 1.0, "tiny-final": 2.0}


def gpu_policy(**patch) -> Policy:
    doc = yaml.safe_load(GPU_POLICY.read_text())
    for path, value in patch.items():
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return Policy.model_validate(doc)


def test_cpu_policy_asks_for_no_gpus():
    res = check(load_policy(ROOT / "autoscaling" / "policy.yaml"), VRAM, TIERS)
    assert res.ok and res.demands == []


@pytest.mark.parametrize(
    ("patch", "ok", "says"),
    [
        ({}, True, "budget policy holds it to the cap"),  # 8 + 12 = 20 > 16, enforced
        ({"cluster.budget_policy": False}, False, "exceeds the cap of 16 by 4"),
        ({"cluster.budget_policy": False, "models.tiny-final.autoscaling.max_replicas": 8},
         True, ""),  # 8 + 8 = 16 fits
        ({"cluster.node_types.nvidia-h200.max_nodes": 3, "cluster.budget_policy": False},
         True, ""),
        ({"models.tiny-final.autoscaling.min_replicas": 12,
          "models.tiny-draft.autoscaling.min_replicas": 8}, False, "minimum replicas alone"),
        ({"models.tiny-final.num_gpus": 16}, False, "exceed a 8-GPU nvidia-h200 node"),
    ],
)
def test_cap_check(patch, ok, says):
    res = check(gpu_policy(**patch), VRAM, TIERS)
    assert res.ok is ok, (res.errors, res.notes)
    assert says in " ".join(res.errors + res.notes)


def test_cap_check_names_memory_and_unranked_tiers():
    res = check(gpu_policy(), {"tiny-draft": 500.0}, {"draft": "tiny-draft", "vip": "x"})
    assert any("needs 500.0 GB vRAM" in e for e in res.errors)
    assert any("vip" in e for e in res.errors)


def facts(profiles: dict[str, Profile]) -> ModelFacts:
    return ModelFacts(64, 64, 2, profiles)


def test_plan_inputs_from_the_shipped_policy_and_lock():
    lock = load_lock(ROOT / "models.lock")
    models = ModelFacts.of_lock(lock.models)
    policy = load_policy(ROOT / "autoscaling" / "policy.yaml")
    inputs = plan_inputs(policy, models, TIERS, {"draft": 10, "final": 1},
                         {"draft": 5, "final": 30})
    draft = inputs.revisions["tiny-draft"].profiles["cpu"]
    final = inputs.revisions["tiny-final"].profiles["cpu"]
    # Shared cores: placed by num_cpus as Ray places them; a batch keeps cpu_threads busy.
    assert draft.gpus_per_replica == final.gpus_per_replica == 0.25
    assert draft.threads == 1 and final.threads == 2  # cpu_threads null: every core
    assert draft.max_batch_images == 8 and inputs.revisions["tiny-final"].profiles[
        "cpu"].max_batch_images == 4
    assert inputs.revisions["tiny-draft"].min_replicas == 2
    assert inputs.tiers["final"].priority > inputs.tiers["draft"].priority
    assert inputs.nodes["cpu"].max_nodes == 1


def test_plan_inputs_say_how_to_get_a_missing_profile():
    with pytest.raises(ValueError, match="imagegen capacity profile"):
        plan_inputs(gpu_policy(), {"tiny-draft": facts({})}, TIERS, {"draft": 1}, {"draft": 1})


PROFILE = Profile(measured="2026-11-25", device="NVIDIA H200", width=1024, height=1024,
                  steps=20, attention="sdpa", seconds_per_megapixel={1: 1.0, 4: 0.5},
                  peak_memory_gb={1: 12.0, 4: 20.0})


def test_profile_is_recorded_into_the_lock_keeping_comments_and_revision(tmp_path):
    path = tmp_path / "models.lock"
    shutil.copy(ROOT / "models.lock", path)
    before = load_lock(path)
    record_profile(path, "tiny-draft", "nvidia-h200", PROFILE)
    record_profile(path, "tiny-draft", "nvidia-h200", PROFILE.model_copy(
        update={"steps": 30}))  # measuring again replaces it
    after = load_lock(path)
    got = after.models["tiny-draft"].profiles
    assert got["nvidia-h200"] == PROFILE.model_copy(update={"steps": 30})
    assert got["cpu"] == before.models["tiny-draft"].profiles["cpu"]
    assert after.models["tiny-draft"].revision == before.models["tiny-draft"].revision
    assert "# models.lock: every model revision" in path.read_text()


def test_cli_check_exit_codes(tmp_path, capsys):
    assert main(["capacity", "--policy", str(GPU_POLICY), "check"]) == 0
    doc = yaml.safe_load(GPU_POLICY.read_text())
    doc["cluster"]["budget_policy"] = False
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(doc))
    assert main(["capacity", "--policy", str(strict), "check"]) == 1
    assert "exceeds the cap of 16 by 6" in capsys.readouterr().err
    bad = copy.deepcopy(doc)
    bad["defaults"]["num_gpus"] = -1
    strict.write_text(yaml.safe_dump(bad))
    assert main(["capacity", "--policy", str(strict), "check"]) == 2


def test_cli_plan_prints_the_plan_and_draws_plots(tmp_path, capsys):
    rc = main(["capacity", "plan", "--rate", "draft=20", "--slo", "draft=1",
               "--plots", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fits the cap" in out and "tiny-draft" in out
    for name in ("latency-tiny-draft.png", "cost-vs-slo.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_cli_plan_what_if_with_extra_profiles(tmp_path, capsys):
    extra = tmp_path / "profiles.toml"
    record_profile(extra, "big-model", "nvidia-h200", PROFILE)
    rc = main(["capacity", "--policy", str(GPU_POLICY), "plan", "--profiles", str(extra),
               "--route", "final=big-model", "--rate", "final=2", "--slo", "final=30"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "big-model" in out and "nvidia-h200" in out and "$84.00/h" in out


def test_cli_simulate_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    rows = ["time_s,tier,width,height,n"] + [f"{i * 0.1:.1f},draft,64,64,1" for i in range(600)]
    trace.write_text("\n".join(rows) + "\n")
    rc = main(["capacity", "simulate", "--trace", str(trace), "--rate", "draft=10"])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(x for x in out.splitlines() if x.startswith("draft"))
    assert int(line.split()[1]) > 500  # completed after warm-up


def test_cli_rejects_a_bad_trace(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("time_s,tier,width,height,n\nsoon,draft,64,64,1\n")
    assert main(["capacity", "simulate", "--trace", str(trace), "--rate", "draft=1"]) == 2
    assert "trace.csv:2" in capsys.readouterr().err


def test_cli_serve_config_is_a_valid_serve_config(capsys):
    from ray.serve.schema import ServeDeploySchema

    assert main(["capacity", "--policy", str(GPU_POLICY), "serve-config",
                 "--arg", "model_dir=/models"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(doc)
    (app,) = doc["applications"]
    assert app["args"] == {"model_dir": "/models", "policy_file": "autoscaling/policy-gpu.yaml"}
    assert app["autoscaling_policy"]["policy_function"] == "autoscaling.serve_policy:BudgetPolicy"
    # gRPC on every node's Serve proxy, as locally (a cluster without it serves no gRPC)
    assert doc["grpc_options"] == {"port": 9000, "grpc_servicer_functions": [
        "serve.ingress.grpc.add_servicers"], "request_timeout_s": 300.0}
    assert doc["http_options"] == {"request_timeout_s": 300.0}  # as `imagegen serve` sets
    from ray.serve._private.utils import import_attr

    assert callable(import_attr(doc["grpc_options"]["grpc_servicer_functions"][0]))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["plan", "--rate", "nope=1"], "unknown tier 'nope'"),
        (["plan", "--route", "draft=ghost", "--rate", "draft=1"], "model 'ghost'"),
        (["plan", "--rate", "draft"], "expected TIER=VALUE"),
    ],
)
def test_cli_bad_input_is_an_error_not_a_traceback(argv, says, capsys):
    try:
        rc = main(["capacity", *argv])
    except SystemExit as e:  # argparse-style refusals
        rc, err = 2, str(e)
    else:
        err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err


def test_cli_simulate_a_tier_without_traffic(capsys):
    assert main(["capacity", "simulate", "--rate", "draft=0", "--rate", "final=1",
                 "--duration", "300"]) == 0


def test_stack_overhead_shifts_every_latency_by_itself():
    from autoscaling.planner import performance

    lock = load_lock(ROOT / "models.lock")
    models = ModelFacts.of_lock(lock.models)
    policy = load_policy(ROOT / "autoscaling" / "policy.yaml")
    plain, loaded = (
        performance(plan_inputs(policy, models, TIERS, {"draft": 30}, {"draft": 1},
                                overhead_s=o), "tiny-draft", 2, gpu="cpu")
        for o in (0.0, 0.015))
    assert loaded.p50_s == pytest.approx(plain.p50_s + 0.015)
    assert loaded.p95_s == pytest.approx(plain.p95_s + 0.015)
    assert loaded.mean_batch_images == plain.mean_batch_images  # queueing is unchanged


def test_trace_gives_rates_and_size_mix_per_tier():
    from autoscaling.capacity import trace_load
    from autoscaling.simulator import Arrival

    arrivals = ([Arrival(i * 0.5, "draft", 64, 64, 1) for i in range(201)]  # 100 s, 2 req/s
                + [Arrival(i * 10.0, "final", 128, 64, 2, 8) for i in range(11)])
    rates, mixes = trace_load(arrivals, {"draft": 2, "final": 4})
    assert rates == pytest.approx({"draft": 2.01, "final": 0.11})
    (draft,) = mixes["draft"]
    assert (draft.width, draft.height, draft.images, draft.steps) == (64, 64, 1, 2)
    (final,) = mixes["final"]
    assert (final.images, final.steps, final.weight) == (2, 8, 11)
    with pytest.raises(ValueError, match="spans no time"):
        trace_load([Arrival(1.0, "draft", 64, 64, 1)], {})


def test_cli_plans_from_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(
        f'{{"time_s": {i * 0.05:.2f}, "tier": "draft", "width": 64, "height": 64, "n": 2}}\n'
        for i in range(401)))
    assert main(["capacity", "plan", "--trace", str(trace), "--slo", "draft=1"]) == 0
    out = capsys.readouterr().out
    row = next(x for x in out.splitlines() if x.startswith("draft"))
    assert float(row.split()[2]) == pytest.approx(20.05, abs=0.01)  # req/s from the trace
    assert main(["capacity", "simulate", "--trace", str(trace)]) == 0  # no --rate needed


def _embedded(rates: dict[str, float], **node):
    lock = load_lock(ROOT / "models.lock")
    policy = load_policy(ROOT / "autoscaling" / "policy.yaml")
    if node:
        doc = policy.model_dump()
        doc["cluster"]["node_types"]["cpu"].update(node)
        policy = type(policy).model_validate(doc)
    return plan_inputs(policy, ModelFacts.of_lock(lock.models), TIERS, rates,
                       {t: 10.0 for t in rates})


def test_the_embedded_plan_describes_what_make_serve_runs():
    """Measured on main: draft=30, final=5 planned 0 draft replicas ("DOES NOT FIT"),
    handing each replica whole cores, while `make serve` runs two single-threaded
    draft replicas beside the final one on the same two cores."""
    from autoscaling import planner

    p = planner.plan(_embedded({"draft": 30, "final": 5}))
    assert p.fits_cap and not p.slo_misses
    assert p.revisions["tiny-draft"].replicas == 2 and p.revisions["tiny-final"].replicas == 1
    assert p.nodes == 1
    # Four threads want two cores: every batch runs slower than on a quiet core.
    assert all(r.slowdown > 1.2 for r in p.revisions.values())
    assert math.isfinite(p.tiers["draft"].p95_s)


def test_shared_cores_slow_batches_by_what_else_runs_there():
    from autoscaling import planner

    lone = planner.contention(_embedded({"draft": 5}), "cpu", {"tiny-draft": 2})
    assert lone["tiny-draft"] == pytest.approx(1.0)  # two 1-thread replicas, two cores
    busy = planner.contention(_embedded({"draft": 5, "final": 5}), "cpu",
                              {"tiny-draft": 2, "tiny-final": 1})
    # The final replica's two threads collide with a draft batch whenever one runs.
    assert busy["tiny-draft"] > 1.2 and busy["tiny-final"] > 1.05
    # The stack's own core time per request slows every batch, more with the rate.
    at = [planner.contention(_embedded({"draft": r}, cpu_per_request_s=0.01), "cpu",
                             {"tiny-draft": 2})["tiny-draft"] for r in (5, 20, 40)]
    assert 1.0 < at[0] < at[1] < at[2]
    # Whole accelerators are never shared.
    whole = _embedded({"draft": 20, "final": 5}, shared_cores=False)
    assert set(planner.contention(whole, "cpu", {"tiny-draft": 2, "tiny-final": 1})
               .values()) == {1.0}


def test_contention_raises_the_predicted_latency():
    from autoscaling import planner

    inputs = _embedded({"draft": 20}, cpu_per_request_s=0.01)
    quiet = _embedded({"draft": 20, "final": 0})
    slow = planner.performance(inputs, "tiny-draft", 2, gpu="cpu")
    fast = planner.performance(quiet, "tiny-draft", 2, gpu="cpu")
    assert slow.p95_s > fast.p95_s * 1.05
    with_final = planner.performance(quiet, "tiny-draft", 2, gpu="cpu",
                                     others={"tiny-final": 1})
    assert with_final.p95_s == pytest.approx(fast.p95_s)  # final idle: no tier rate


def _scrape(busy: dict[tuple[str, int], float], work: dict[tuple[str, int], float],
            requests: float, extra: str = "") -> str:
    lines = ["# TYPE ray_imagegen_pipeline_busy_seconds_total counter",
             "# TYPE ray_imagegen_pipeline_work_total counter",
             "# TYPE ray_imagegen_requests_total counter"]
    for (m, b), v in busy.items():
        lines.append(f'ray_imagegen_pipeline_busy_seconds_total{{model="{m}",revision="r",'
                     f'images="{b}"}} {v}')
    for (m, b), v in work.items():
        lines.append(f'ray_imagegen_pipeline_work_total{{model="{m}",revision="r",'
                     f'images="{b}"}} {v}')
    lines.append(f'ray_imagegen_requests_total{{tier="draft",outcome="ok"}} {requests}')
    return "\n".join(lines) + "\n" + extra


def test_in_place_profile_reads_the_counters_growth_and_takes_contention_out():
    from autoscaling.profiler import in_place, parse_metrics

    before = parse_metrics(_scrape({("d", 1): 5.0}, {("d", 1): 1.0}, 100))
    # 10 s window: 2 replicas, each busy 80% (16 s); 1-image batches at 0.004096 MP x 2
    # steps took 0.04 s: 4.88 s per megapixel-step; 2-image batches 0.06 s.
    after = parse_metrics(_scrape({("d", 1): 5.0 + 8.0, ("d", 2): 8.0},
                                  {("d", 1): 1.0 + 8.0 / 0.04 * 0.004096 * 2,
                                   ("d", 2): 8.0 / 0.06 * 2 * 0.004096 * 2}, 300))
    quiet = in_place(before, after, 10.0, models={"d": (2, 1.0)}, cores=2, steps={"d": 2},
                     cpu_cores_busy=None, device="cpu in place")
    spmp = quiet.measured_spmp["d"]
    assert spmp[1] == pytest.approx(0.04 / 0.004096)
    assert spmp[2] == pytest.approx(0.06 / (2 * 0.004096))
    assert quiet.busy["d"] == pytest.approx(0.8) and quiet.requests_per_s == 20
    assert quiet.profiles["d"].seconds_per_megapixel == pytest.approx(spmp, rel=1e-5)
    assert quiet.cpu_per_request_s is None and quiet.slowdown["d"] == 1.0
    # The node's cores were busier than the pipelines: the stack's share per request,
    # and the slowdown it caused taken out of the profile.
    loaded = in_place(before, after, 10.0, models={"d": (2, 1.0)}, cores=2, steps={"d": 2},
                      cpu_cores_busy=1.9, device="cpu in place")
    # The pipelines got less than the threads they wanted (they ran slowed), so the
    # stack had more than the 0.3 cores left over from their wanted 1.6.
    assert loaded.slowdown["d"] > 1.0
    used = 1.6 / loaded.slowdown["d"]
    assert loaded.cpu_per_request_s == pytest.approx((1.9 - used) / 20, rel=1e-3)
    assert loaded.cpu_per_request_s > (1.9 - 1.6) / 20
    got = loaded.profiles["d"].seconds_per_megapixel
    assert got[1] == pytest.approx(spmp[1] / loaded.slowdown["d"], rel=1e-5)


def test_in_place_profile_on_a_model_that_did_not_run_is_empty():
    from autoscaling.profiler import in_place, parse_metrics

    same = parse_metrics(_scrape({("d", 1): 5.0}, {("d", 1): 1.0}, 100))
    got = in_place(same, same, 5.0, models={"d": (1, 1.0)}, cores=2, steps={"d": 2},
                   cpu_cores_busy=0.1, device="x")
    assert got.profiles == {} and got.busy["d"] == 0.0


def test_an_in_place_profile_replaces_only_the_batch_sizes_its_window_saw():
    """`--in-place --write` keeps the quiet run's other batch sizes and its memory,
    and brings what it saw to the quiet run's steps (the planner scales by steps)."""
    from serve.cli.capacity import over_quiet

    quiet = Profile(measured="2026-01-01", device="cpu x2", width=64, height=64, steps=2,
                    attention="sdpa", seconds_per_megapixel={1: 10.0, 2: 8.0, 4: 6.0, 8: 5.0},
                    peak_memory_gb={1: 0.5, 2: 0.6, 4: 0.8, 8: 1.2})
    seen = Profile(measured="2026-12-02", device="cpu in place", width=64, height=64,
                   steps=4, attention="sdpa", seconds_per_megapixel={1: 24.0, 3: 15.0},
                   peak_memory_gb={1: 0.0, 3: 0.0})
    got = over_quiet(quiet, seen)
    assert got.seconds_per_megapixel == {1: 12.0, 2: 8.0, 3: 7.5, 4: 6.0, 8: 5.0}
    # a slower lone batch than the quiet pair's half: the pair is raised to match,
    # so the lock still parses (a batch never takes less time than a smaller one)
    slow = over_quiet(quiet, seen.model_copy(update={"seconds_per_megapixel": {1: 40.0}}))
    assert slow.seconds_per_megapixel[1] == 20.0 and slow.seconds_per_megapixel[2] == 10.0
    assert all(slow.seconds_per_megapixel[b] * b <= slow.seconds_per_megapixel[c] * c
               for b in slow.seconds_per_megapixel for c in slow.seconds_per_megapixel if b < c)
    assert got.peak_memory_gb == {1: 0.5, 2: 0.6, 3: 1.2, 4: 0.8, 8: 1.2}
    assert (got.steps, got.measured, got.device) == (2, "2026-12-02", "cpu in place")


def test_host_cores_are_read_only_where_a_ray_process_serves_the_port(tmp_path):
    """/proc/stat describes this machine: it counts for a local stack (Ray's agent
    serves the metrics), not for a port-forward or anything else on loopback."""
    import socket
    import subprocess
    import sys
    import time

    from serve.cli.capacity import _busy_cores

    listen = ("import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); "
              "s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)")
    agent = tmp_path / "ray" / "dashboard" / "agent.py"
    agent.parent.mkdir(parents=True)
    agent.write_text(listen.replace("; ", "\n"))
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for name, cmd in (
        ("other", [sys.executable, "-c", listen]), ("ray", [sys.executable, str(agent)]))}
    try:
        ports = {name: int(p.stdout.readline()) for name, p in procs.items()}
        time.sleep(0.2)
        got = {name: _busy_cores({}, "127.0.0.1", port) for name, port in ports.items()}
        assert got["other"] is None
        assert got["ray"] is not None and got["ray"][0] == "proc" and got["ray"][1] > 0
        with socket.socket() as s:  # nobody listens: unknown, not this machine's cores
            s.bind(("127.0.0.1", 0))
            assert _busy_cores({}, "127.0.0.1", s.getsockname()[1]) is None
        assert _busy_cores({}, "metrics.example", ports["ray"]) is None
    finally:
        for p in procs.values():
            p.kill()
            p.wait()

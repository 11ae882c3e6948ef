"""Run in its own process (its own Ray, 3 fake GPUs): deploy budget_app with the
budget policy through the Serve config, drive queue pressure, and print one JSON
line per sample of the replica states."""

import json
import socket
import sys
import time

import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

BUDGET = 3


def states() -> dict[str, dict[str, int]]:
    app = serve.status().applications.get("budget")
    if app is None:
        return {}
    return {n: {str(k): v for k, v in d.replica_states.items()}
            for n, d in app.deployments.items() if n in ("hi", "lo")}


def held(s: dict[str, int]) -> int:
    """Replicas holding (or waiting for) a fake GPU: stopping ones too."""
    return sum(s.values())


def wait_for(pred, deadline_s: float, log) -> dict:
    end = time.monotonic() + deadline_s
    while True:
        s = states()
        log.append(s)
        print(json.dumps({"t": round(time.monotonic(), 2), "states": s}), flush=True)
        if pred(s) or time.monotonic() > end:
            return s
        time.sleep(0.2)


def running(s, name) -> int:
    return s.get(name, {}).get("RUNNING", 0)


def main() -> int:
    ray.init(num_cpus=2, resources={"fake_gpu": BUDGET}, include_dashboard=False,
             logging_level="WARNING")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = {"gpu_type": "fake", "gpus": 1, "target_images": 8}
    config = {"applications": [{
        "name": "budget", "import_path": "budget_app:app", "route_prefix": "/budget",
        "autoscaling_policy": {
            "policy_function": "autoscaling.serve_policy:BudgetPolicy",
            "policy_kwargs": {"budget": {"fake": BUDGET},
                              "deployments": {"hi": {**spec, "priority": 3},
                                              "lo": {**spec, "priority": 1}},
                              "release_s": 5},
        },
    }]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    log: list = []
    wait_for(lambda s: running(s, "hi") == 1 and running(s, "lo") == 1, 60, log)
    handle = {n: serve.get_deployment_handle(n, app_name="budget") for n in ("hi", "lo")}
    handle["lo"].set.remote(24).result()  # lo wants 3; the budget leaves it 2
    phase1 = wait_for(lambda s: running(s, "lo") == 2, 30, log)
    handle["hi"].set.remote(24).result()  # hi (priority 3) wants 3: lo shrinks to 1
    phase2 = wait_for(lambda s: running(s, "hi") == 2 and held(s.get("lo", {})) == 1, 60, log)
    time.sleep(3)  # and it stays there
    final = wait_for(lambda s: True, 0, log)
    peak = max(sum(held(d) for d in s.values()) for s in log if s)
    print(json.dumps({"phase1": phase1, "phase2": phase2, "final": final, "peak": peak}))
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

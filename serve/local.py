"""The local service: Ray + Serve on this machine, embedded defaults."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from .config import Settings

log = logging.getLogger("imagegen")

DIRECT_INGRESS_PORTS = 8  # ingress replicas that can listen directly, from `port` up


def start(settings: Settings, *, num_cpus: int | None = None) -> str:
    """Start Ray and Serve, deploy the app, wait until it runs; returns the base URL."""
    import ray
    from ray import serve as ray_serve

    from .app import APP_NAME, build_app

    # Build before Ray starts so a bad lock or routing fails fast and plainly.
    app = build_app(settings)
    from autoscaling.policies import load_policy

    if load_policy(settings.policy_file).cluster.budget_policy:
        # serve.run cannot carry an application-level policy (Serve 2.60).
        log.warning("cluster.budget_policy is set, but the budget autoscaling policy only "
                    "runs when deployed through a Serve config (`imagegen capacity "
                    "serve-config`); here each revision autoscales on its own")
    proxy_port = settings.port
    if settings.direct_ingress:
        # The ingress replica listens on `port` itself: the proxy hop cost ~7 ms per
        # request and ~40% of throughput on 2 cores. Serve still starts its proxy
        # (a fallback route); it moves aside. Workers read these at start.
        proxy_port = settings.port + DIRECT_INGRESS_PORTS
        os.environ.update(
            RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
            RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(settings.port),
            RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(proxy_port),
        )
        # Serve drains a direct ingress 30 s on shutdown so a load balancer can
        # notice; locally there is none.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            # Ray's metrics agent serves every process's metrics (ours included,
            # as ray_imagegen_*) here.
            _metrics_export_port=settings.metrics_port,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    ray_serve.start(
        http_options={
            "host": settings.host,
            "port": proxy_port,
            "request_timeout_s": settings.request_timeout_s,
        },
        logging_config={"enable_access_log": settings.log_requests},
    )
    ray_serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{settings.host}:{settings.port}"


def stop() -> None:
    import ray
    from ray import serve as ray_serve

    if ray.is_initialized():
        ray_serve.shutdown()
        ray.shutdown()


def run_local(settings: Settings) -> int:
    """`imagegen serve`: build missing tiny models, serve until SIGINT/SIGTERM."""
    if settings.build_missing and settings.engine == "diffusers":
        from .models_cli import build_missing

        build_missing(settings)
    t0 = time.perf_counter()
    print("starting Ray and Serve (about 20 s)...", flush=True)
    url = start(settings)
    print(f"imagegen ready in {time.perf_counter() - t0:.0f} s at {url}", flush=True)
    print(f"  metrics: http://{settings.host}:{settings.metrics_port}/metrics", flush=True)
    print(f"  try: imagegen generate 'a red fox' --url {url} -o fox.png", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("stopping...", flush=True)
    stop()
    return 0

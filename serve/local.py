"""The local service: Ray + Serve on this machine, embedded defaults."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from .config import Settings

log = logging.getLogger("imagegen")


def start(settings: Settings, *, num_cpus: int | None = None) -> str:
    """Start Ray and Serve, deploy the app, wait until it runs; returns the base URL."""
    import ray
    from ray import serve as ray_serve

    from .app import APP_NAME, build_app

    # Build before Ray starts so a bad lock or routing fails fast and plainly.
    app = build_app(settings)
    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    ray_serve.start(
        http_options={
            "host": settings.host,
            "port": settings.port,
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
    print(f"  try: imagegen generate 'a red fox' --url {url} -o fox.png", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("stopping...", flush=True)
    stop()
    return 0

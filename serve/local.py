"""The local service: Ray + Serve on this machine, embedded defaults. It serves
exactly on the ports it was given or fails naming the one that is taken (Ray
Serve's direct ingress would silently take the next free port)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import threading
from typing import Any

from .config import Settings
from .errors import ConfigError

log = logging.getLogger("imagegen")

DIRECT_INGRESS_PORTS = 8  # ingress replicas that can listen directly, from `port` up
STOP_GRACE_S = 4.0  # Serve's graceful shutdown on stop, before Ray stops everything
# Ray Serve's throughput-optimized mode (Ray docs, "Enable high throughput"): handle
# calls go over gRPC straight to the replica instead of as Ray actor tasks, and user
# code and the router run on the replica's own event loop (no cross-thread hand-off
# per ASGI message or handle call). Issue 18, c=1 on 2 cores: the handle hop 7.7-8.3
# -> 4.8-5.5 ms (README § Benchmark). It also turns on direct ingress, which
# `direct_ingress` decides here instead. Workers read these at start. The gRPC hop
# caps a message at 4 MiB by default (8 raw 1024x1024 images are 24 MiB): gRPC's own
# ceiling instead (every deployment also carries it in its runtime_env: app.py
# with_grpc_limit). And Serve's logs (and a replica's tracebacks) stay on stderr,
# which the mode turns off.
GRPC_LIMIT = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **GRPC_LIMIT,
             "RAY_SERVE_LOG_TO_STDERR": "1"}


def ports(settings: Settings) -> dict[str, int]:
    """Every port the local service listens on, by what it serves."""
    out = {"HTTP": settings.port, "metrics": settings.metrics_port}
    if settings.grpc_port:
        out["gRPC"] = settings.grpc_port
    if settings.direct_ingress:
        out["Serve proxy"] = settings.port + DIRECT_INGRESS_PORTS
        if settings.grpc_port:
            out["Serve gRPC proxy"] = settings.grpc_port + DIRECT_INGRESS_PORTS
    return out


def check_ports(settings: Settings) -> None:
    """ConfigError naming the first port that is taken (or given twice)."""
    if settings.direct_ingress and settings.grpc_port and (
            abs(settings.port - settings.grpc_port) <= DIRECT_INGRESS_PORTS):
        # Each protocol's replicas take ports from its own range (port..port+8).
        raise ConfigError(f"the HTTP ports {settings.port}-{settings.port + DIRECT_INGRESS_PORTS}"
                          f" and the gRPC ports {settings.grpc_port}-"
                          f"{settings.grpc_port + DIRECT_INGRESS_PORTS} overlap; choose "
                          "--port and --grpc-port at least 9 apart")
    seen: dict[int, str] = {}
    for what, port in ports(settings).items():
        if port in seen:
            raise ConfigError(f"the {what} port and the {seen[port]} port are both {port}")
        seen[port] = what
        family, kind, proto, _, addr = socket.getaddrinfo(
            settings.host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            # As the servers bind: a port whose old connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                raise ConfigError(f"{what} port {port} on {settings.host} is in use "
                                  f"({e.strerror}); {_flag(what)}") from None


def _flag(what: str) -> str:
    return {"metrics": "choose another with --metrics-port",
            "gRPC": "choose another with --grpc-port (0: no gRPC)",
            "Serve proxy": "it is --port + 8; choose another --port",
            "Serve gRPC proxy": "it is --grpc-port + 8; choose another --grpc-port"}.get(
        what, "choose another with --port")


def _check_listeners(settings: Settings) -> None:
    """After start: each port is held by this process tree, not by another program
    that took it meanwhile."""
    import psutil

    me = psutil.Process()
    ours = {me.pid, *(c.pid for c in me.children(recursive=True))}
    held = {c.laddr.port: c.pid for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}
    for what, port in ports(settings).items():
        if held.get(port) not in ours:
            raise ConfigError(f"{what} port {port} was taken by another process while the "
                              f"service started; {_flag(what)}")


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the caller's
    handlers. For ray.init: a node interrupted while it starts leaves its agents
    running, orphaned, and Ray's driver replaces the SIGTERM handler with a crash
    handler that aborts (the caller's is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    held: list[int] = []
    for sig in kept:
        signal.signal(sig, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])


def start(settings: Settings, *, num_cpus: int | None = None) -> str:
    """Start Ray and Serve, deploy the app, wait until it runs; returns the base URL.
    ConfigError (and nothing left running) when a port is taken."""
    import ray

    from .app import build_app

    check_ports(settings)
    # Build before Ray starts so a bad lock or routing fails fast and plainly.
    app = build_app(settings)
    from autoscaling.policies import load_policy

    if load_policy(settings.policy_file).cluster.budget_policy:
        # serve.run cannot carry an application-level policy (Serve 2.60).
        log.warning("cluster.budget_policy is set, but the budget autoscaling policy only "
                    "runs when deployed through a Serve config (`imagegen capacity "
                    "serve-config`); here each revision autoscales on its own")
    proxy_port, grpc_proxy_port = settings.port, settings.grpc_port
    # Workers read these at start: Ray's daemons (and so every worker) take this
    # process's environment at ray.init. Set around it only: left here, they would
    # reach every process this one starts later (a sync handle in a child driver
    # fails with the router on its caller's loop).
    env = {name: os.environ.get(name, value) for name, value in SERVE_ENV.items()}
    env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1" if settings.direct_ingress else "0"
    if settings.direct_ingress:
        # The ingress replica listens on `port` itself: the proxy hop cost ~7 ms per
        # request and ~40% of throughput on 2 cores. Serve still starts its proxy
        # (a fallback route); it moves aside.
        proxy_port = settings.port + DIRECT_INGRESS_PORTS
        env.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(settings.port),
                   RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(proxy_port))
        if settings.grpc_port:
            grpc_proxy_port = settings.grpc_port + DIRECT_INGRESS_PORTS
            env.update(RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT=str(settings.grpc_port),
                       RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT=str(grpc_proxy_port))
        # Serve holds a stopping direct ingress open 30 s so a load balancer can
        # notice; locally there is none.
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = os.environ.get(
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    if not ray.is_initialized():
        with _signals_held(), _environ(env):
            _init_ray(settings, num_cpus)
    try:
        _start_serve(settings, app, proxy_port, grpc_proxy_port)
    except Exception as e:
        # A port another process took after check_ports (Serve says which address).
        taken = re.search(r"Failed to bind to address '[^']*:(\d+)'", str(e))
        if taken is None:
            raise
        stop()
        port = int(taken.group(1))
        what = next((w for w, n in ports(settings).items() if n == port), "a")
        raise ConfigError(f"{what} port {port} was taken by another process while the "
                          f"service started; {_flag(what)}") from None
    try:
        _check_listeners(settings)
    except ConfigError:
        stop()
        raise
    return f"http://{settings.host}:{settings.port}"


def _start_serve(settings: Settings, app, proxy_port: int, grpc_proxy_port: int) -> None:
    from ray import serve as ray_serve

    from .app import APP_NAME
    from .ingress.grpc import SERVICER_FUNCTIONS

    ray_serve.start(
        http_options={
            "host": settings.host,
            "port": proxy_port,
            "request_timeout_s": settings.request_timeout_s,
        },
        # Serve's gRPC servers bind [::] whatever `host` says (Ray 2.60, hard-coded):
        # locally, run them inside a loopback-only namespace (scripts/loopback-serve).
        grpc_options={
            "port": grpc_proxy_port,
            "grpc_servicer_functions": SERVICER_FUNCTIONS,
            "request_timeout_s": settings.request_timeout_s,
        } if settings.grpc_port else None,
        logging_config={"enable_access_log": settings.log_requests},
    )
    ray_serve.run(app, name=APP_NAME, route_prefix="/")


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """This process's environment with `env` set, as it was afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_ray(settings: Settings, num_cpus: int | None) -> None:
    import ray
    from ray._private import utils as ray_utils

    # ray.init first installs sys.exit as the SIGTERM handler, then starts the node:
    # a SIGTERM then would interrupt it halfway. Keep the held one (Ray 2.60's
    # worker.py looks the installer up on this module at call time).
    install = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    # Serve's uvicorn servers would take X-Forwarded-For from loopback peers as the
    # client's address; the trusted-gateway check needs the socket's own peer, so no
    # one is trusted to say otherwise (Ray's workers inherit this environment).
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    try:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            # Ray's metrics agent serves every process's metrics (ours included,
            # as ray_imagegen_*) here.
            _metrics_export_port=settings.metrics_port,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    finally:
        ray_utils.set_sigterm_handler = install


def stop(grace_s: float = STOP_GRACE_S) -> None:
    """Shut Serve down gracefully (requests in flight may finish) for at most
    `grace_s`, then stop Ray and whatever still runs."""
    import ray
    from ray import serve as ray_serve

    if not ray.is_initialized():
        return
    try:
        asyncio.run(asyncio.wait_for(ray_serve.shutdown_async(), grace_s))
    except TimeoutError:
        # Under steady load the ingress never drains (keep-alive clients keep
        # sending), and Serve floors its wait at 5 s plus the draining period.
        log.warning("Serve did not stop within %.0f s; stopping Ray", grace_s)
    finally:
        ray.shutdown()


def readiness(url: str) -> dict[str, Any]:
    """/readyz of the running service: `tiers` (each ready or not) and `models` (per
    revision `ready`, `reason`, the `tiers` it is primary of and those it `backs`)."""
    import httpx

    return httpx.get(f"{url}/readyz", timeout=10).json()

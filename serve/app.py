"""build_app: the one import path (`serve.app:build_app`). Wiring only."""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from autoscaling.policies import (
    ingress_deployment_options,
    load_policy,
    model_deployment_options,
)

from .config import Settings, load_settings
from .deployments.ingress import Access, Coalescing, Ingress, RoutingSource
from .deployments.model import ModelDeployment
from .deployments.safety import SafetyDeployment
from .engines.base import Engine
from .errors import ConfigError
from .lockfile import load_lock
from .quotas.auth import Upstream
from .quotas.idempotency import LEASE_S
from .quotas.keys import FileKeys, sqlite_path, state_backend
from .quotas.plans import load_plans, unrouted_tiers
from .routing import load_routing
from .safety.classifier import check_spec, load_attribute
from .safety.policy import load_policy_file
from .storage.recipe import load_secret
from .storage.store import open_store
from .templates.library import load_library

APP_NAME = "imagegen"
log = logging.getLogger("imagegen")
# What a stopping replica needs past its requests' grace: closing its servers and
# running its destructor, before Serve's controller kills it.
DRAIN_MARGIN_S = 10.0


def engine_class(kind: str) -> type[Engine]:
    if kind == "fake":
        from .engines.fake import FakeEngine

        return FakeEngine
    from .engines.diffusers_engine import DiffusersEngine  # torch imports lazily

    return DiffusersEngine


def storage_of(settings: Settings) -> dict[str, Any]:
    """What every ingress replica opens its object store and result cache with; a bad
    URL or a missing secret refuses to start."""
    open_store(settings.storage_url, endpoint_url=settings.s3_endpoint_url,
               sse=settings.s3_sse, kms_key_id=settings.s3_kms_key_id)
    secret = settings.storage_secret
    if secret is None:
        if state_backend(settings.state_url) != "sqlite":
            raise ConfigError("storage_secret is required with a Redis state store: every "
                              "ingress replica must key recipes and sign links alike")
        path = sqlite_path(settings.state_url).parent / "storage-secret"
        secret = load_secret(None, path).decode()
    return {"url": settings.storage_url, "endpoint_url": settings.s3_endpoint_url,
            "sse": settings.s3_sse, "kms_key_id": settings.s3_kms_key_id, "secret": secret,
            "scope": settings.cache_scope, "url_ttl_s": settings.url_ttl_s,
            "cdn_base_url": settings.cdn_base_url}


def batch_of(settings: Settings) -> dict[str, Any]:
    """Every ingress replica's batch settings, and the webhook secret they share."""
    secret = settings.webhook_secret
    if secret is None and settings.webhook_allowlist:
        if state_backend(settings.state_url) != "sqlite":
            raise ConfigError("webhook_secret is required with a Redis state store: every "
                              "ingress replica signs batch webhooks alike")
        from .batch.webhooks import format_secret

        path = sqlite_path(settings.state_url).parent / "webhook-secret"
        secret = format_secret(load_secret(None, path)[:32])
    if settings.webhook_allowlist:
        from .batch.webhooks import Webhooks, parse_secret

        Webhooks(parse_secret(secret), settings.webhook_allowlist)  # a bad entry: refused
    return {"max_items": settings.batch_max_items, "concurrency": settings.batch_concurrency,
            "yield_at": settings.batch_yield_at, "attempts": settings.batch_attempts,
            "lease_s": settings.batch_lease_s, "webhook_allowlist": settings.webhook_allowlist,
            "webhook_secret": secret}


def c2pa_of(settings: Settings) -> tuple[str, str, str] | None:
    """The C2PA signing credentials, tried once here: a key that does not fit its
    certificate, or an unusable certificate, refuses to start."""
    if not (settings.c2pa_cert_file or settings.c2pa_key_file):
        return None
    if not (settings.c2pa_cert_file and settings.c2pa_key_file):
        raise ConfigError("C2PA signing needs both c2pa_cert_file and c2pa_key_file")
    from .imaging.provenance import C2paSigner  # the provenance extra

    try:
        C2paSigner(settings.c2pa_cert_file, settings.c2pa_key_file,
                   alg=settings.c2pa_alg).close()
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"C2PA signing: {e}") from None
    return str(settings.c2pa_cert_file), str(settings.c2pa_key_file), settings.c2pa_alg


def drain_grace_s(settings: Settings) -> float:
    """How long a stopping replica gives the requests it holds: request_timeout_s, the
    deadline Serve itself puts on every request (proxy and direct ingress), so nothing
    admitted before the stop is cut short and nothing waits longer than it could run."""
    return settings.request_timeout_s


def with_drain(options: dict[str, Any], grace_s: float) -> dict[str, Any]:
    """Deployment options in which Serve waits out the drain before killing a replica
    (Serve's default graceful_shutdown_timeout_s, 20 s, is shorter than a generation
    can be); a value the policy sets stays."""
    return {"graceful_shutdown_timeout_s": grace_s + DRAIN_MARGIN_S, **options}


def with_grpc_limit(options: dict[str, Any]) -> dict[str, Any]:
    """Deployment options whose replica lifts gRPC's 4 MiB message cap (local.py's
    SERVE_ENV value) in its own environment: the ingress calls models and the
    classifier by value over gRPC (ingress.py BY_REFERENCE), and this way the limit
    holds however Ray was started (`serve run`, a RayService not built from this
    repo), not only where the pod or `imagegen serve` set it."""
    from .local import GRPC_LIMIT

    actor = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **GRPC_LIMIT}
    return {**options, "ray_actor_options": {**actor, "runtime_env": runtime_env}}


def build_app(args: dict[str, Any] | Settings | None = None) -> Application:
    """Ingress + one model deployment per models.lock revision (+ the image
    classifier's, where it runs apart).

    `args` are Settings fields (as `serve run serve.app:build_app key=value` or a
    RayService `args:` map pass them) or a Settings object.
    """
    settings = args if isinstance(args, Settings) else load_settings(**(args or {}))
    lock = load_lock(settings.lock_file)
    routing = load_routing(settings.routing_file, lock)
    policy = load_policy(settings.policy_file)
    engine_cls = engine_class(settings.engine)
    grace = drain_grace_s(settings)
    logging_config = {"enable_access_log": settings.log_requests}
    models = {}
    coalescing = {}
    for name, entry in lock.models.items():
        p = policy.for_model(name)
        coalescing[name] = Coalescing(
            max_images=p.batching.max_batch_images,
            # Two calls per replica: one running, one queued behind it, so the
            # pipeline never waits for the ingress round trip. The queued one leaves
            # full, or when a call ends: sent at once, it took the one request that
            # happened to be waiting (issue 18: batches of 6.1-6.6 at c=16, not 8).
            max_calls=2 * p.autoscaling.max_replicas,
            max_partial=p.autoscaling.max_replicas,
            max_queued=None if p.max_queued_requests < 0 else p.max_queued_requests,
        )
        options = dict(settings.engine_options)
        if threads := settings.threads or p.cpu_threads:
            options["threads"] = threads
        models[name] = ModelDeployment.options(
            name=entry.deployment_name,
            logging_config=logging_config,
            **with_grpc_limit(with_drain(model_deployment_options(p), grace)),
        ).bind(entry, engine_cls, str(settings.model_dir), options)
    state_backend(settings.state_url)  # a bad URL refuses to start
    plans = load_plans(settings.plans_file)
    for name, tiers in unrouted_tiers(plans, set(routing.tiers)).items():
        log.warning("plan %r names tiers the routing document does not have: %s", name,
                    ", ".join(tiers))
    if settings.keys_file:  # a bad keys file refuses to start, naming the problem
        for record in FileKeys(settings.keys_file).by_hash.values():
            if record.plan not in plans.plans:
                raise ConfigError(f"keys file {settings.keys_file}: key {record.key_id} names "
                                  f"plan {record.plan!r}, not in {settings.plans_file}")
    prompt_policy = load_policy_file(settings.prompt_policy_file)  # bad: refuses to start
    for name, spec in plans.plans.items():
        if spec.safety_profile not in prompt_policy.spec.profiles:
            raise ConfigError(f"plan {name!r}: safety_profile {spec.safety_profile!r} is not in "
                              f"{settings.prompt_policy_file} (it has "
                              f"{', '.join(sorted(prompt_policy.spec.profiles))})")
    load_library(settings.styles_dir)  # a bad style library refuses to start, naming the file
    upstream = None
    if settings.trusted_proxies:
        if settings.identity_plan not in plans.plans:
            raise ConfigError(f"identity_plan {settings.identity_plan!r} is not in "
                              f"{settings.plans_file}")
        upstream = Upstream(tuple(str(n) for n in settings.trusted_proxies),
                            settings.identity_header.lower(), settings.identity_plan)
    access = Access(settings.state_url,
                    str(settings.keys_file) if settings.keys_file else None,
                    settings.allow_pinning, plans, settings.in_flight_per_principal,
                    upstream,
                    # a claim outlives its request: past the deadline, plus the stages after
                    idempotency_lease_s=max(LEASE_S, settings.request_timeout_s + 60),
                    prompt_policy_file=str(settings.prompt_policy_file),
                    styles_dir=str(settings.styles_dir),
                    review_keep_prompts=settings.review_keep_prompts,
                    image_classifier=settings.image_classifier,
                    image_classifier_placement=settings.image_classifier_placement,
                    image_safety_fail_open=settings.image_safety_fail_open,
                    captioner=settings.captioner,
                    storage=storage_of(settings), c2pa=c2pa_of(settings),
                    batch=batch_of(settings))
    check_spec(settings.image_classifier)  # a spec that can never work refuses to start
    if settings.captioner:
        load_attribute(settings.captioner, "captioner")
    safety = None
    if settings.image_classifier != "none" and settings.image_classifier_placement == "deployment":
        safety = SafetyDeployment.options(
            name="image-safety", num_replicas=settings.image_classifier_replicas,
            logging_config=logging_config,
            **with_grpc_limit({"ray_actor_options": SafetyDeployment.ray_actor_options}),
        ).bind(settings.image_classifier)
    source = RoutingSource(
        file=str(settings.routing_file), configmap=settings.routing_configmap,
        namespace=settings.routing_namespace, key=settings.routing_key,
        kubeconfig=settings.kubeconfig,
    )
    return Ingress.options(
        logging_config=logging_config,
        **with_grpc_limit(with_drain(ingress_deployment_options(policy.ingress), grace)),
    ).bind(lock, routing, models, coalescing, settings.max_body_bytes, source, access, safety,
           drain_grace_s=grace)

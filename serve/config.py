"""Settings: one pydantic-settings model, env prefix IMAGEGEN_, optional YAML file.

Precedence, highest first: explicit arguments, IMAGEGEN_* environment variables,
the YAML file (`--config FILE` or IMAGEGEN_CONFIG), the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, IPvAnyNetwork, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .errors import ConfigError, describe

ROOT = Path(__file__).resolve().parent.parent  # the checkout or RayService working_dir


def _state_url() -> str:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return f"sqlite://{Path(base) / 'imagegen' / 'state.db'}"


def _storage_url() -> str:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return f"file://{Path(base) / 'imagegen' / 'images'}"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imagegen" / "models"


class Settings(BaseSettings):
    """Everything an operator may set. Documented in README § Settings."""

    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(8000, description="HTTP port")
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        9000, description="gRPC port (imagegen.v1.Images, grpc.health.v1, reflection); 0: "
        "no gRPC",
    )
    metrics_port: Annotated[int, Field(ge=1, le=65535)] = Field(
        8080,
        description=(
            "local service: port of Ray's metrics endpoint (Prometheus text at /metrics); "
            "on a cluster Ray's --metrics-export-port sets it"
        ),
    )
    lock_file: Path = Field(ROOT / "models.lock", description="the models.lock to serve")
    prompt_policy_file: Path = Field(
        ROOT / "serve" / "safety" / "prompt_policy.yaml", description="the prompt policy: "
        "banned terms by category, an allowlist, safety profiles (watched: a new version "
        "applies live, a bad one is refused)",
    )
    styles_dir: Path = Field(
        ROOT / "serve" / "templates" / "styles", description="the style library: one YAML "
        "file per template version (a mounted ConfigMap works), watched: edits apply live, "
        "a bad file is refused and the last good library stays",
    )
    routing_file: Path = Field(
        ROOT / "serve" / "routing.yaml",
        description="the routing document (YAML), watched: edits apply without a restart; "
        "also the start-up default when routing_configmap is set",
    )
    routing_configmap: str | None = Field(
        None, description="follow this ConfigMap through the Kubernetes API instead of the "
        "file (applied within about a second of a change)",
    )
    routing_namespace: str | None = Field(
        None, description="the ConfigMap's namespace (default: the pod's own)")
    routing_key: str = Field("routing.yaml", description="the ConfigMap key holding the document")
    kubeconfig: str | None = Field(
        None, description="kubeconfig for the API outside a pod (in a pod: its service account)")
    policy_file: Path = Field(
        ROOT / "autoscaling" / "policy.yaml",
        description="per-model replica, batching and autoscaling policy (YAML)",
    )
    model_dir: Path = Field(
        default_factory=_cache_dir, description="where built or fetched model files live"
    )
    engine: Literal["diffusers", "fake"] = Field(
        "diffusers", description="diffusers runs the real pipelines; fake is for tests"
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to every engine (e.g. xformers: false)"
    )
    threads: Annotated[int, Field(ge=1, le=256)] | None = Field(
        None, description="torch threads per CPU replica, overriding the policy's cpu_threads"
    )
    direct_ingress: bool = Field(
        True,
        description=(
            "local service: the ingress replica serves HTTP itself on `port` (Ray Serve "
            "direct ingress), skipping the proxy hop; Serve's proxy moves to port+8"
        ),
    )
    build_missing: bool = Field(
        True, description="`imagegen serve` builds missing builtin tiny models first"
    )
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        300.0, description="end-to-end deadline of one request through the proxy"
    )
    max_body_bytes: Annotated[int, Field(ge=1024, le=16 << 20)] = Field(
        64 << 10, description="largest accepted request body"
    )
    state_url: str = Field(
        default_factory=_state_url, description="the state store (API keys; quotas and "
        "queues next): sqlite:///ABSOLUTE/PATH (one machine), redis://HOST:PORT/DB or "
        "redis+cluster://HOST:PORT (a Redis Cluster, from one seed node)",
    )
    keys_file: Path | None = Field(
        None, description="read-only API keys from a YAML file (a mounted Secret), beside "
        "the state store's",
    )
    plans_file: Path = Field(
        ROOT / "serve" / "plans.yaml", description="the plans a key may name: tiers, "
        "limits, budget, pricing (README § Plans)",
    )
    in_flight_per_principal: Annotated[int, Field(ge=0, le=100000)] = Field(
        64, description="requests one principal may have in flight per ingress replica "
        "(its fair share of the queue); the next is 429 rate_limited. 0: no limit",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list, description="addresses or networks of a gateway that "
        "authenticates callers itself and names them in identity_header; empty (the "
        "default): off, and the header is ignored from everyone",
    )
    identity_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")] = Field(
        "X-Imagegen-Principal", description="the header (gRPC: metadata) in which a trusted "
        "proxy names the principal (not a binary `-bin` gRPC key)",
    )
    identity_plan: str = Field(
        "default", description="the plan of a principal a trusted proxy names (role user)",
    )
    review_keep_prompts: bool = Field(
        False, description="a blocked request's case in the review queue keeps its prompt "
        "text (else hashes only; never for the always-on category)",
    )
    storage_url: str = Field(
        default_factory=_storage_url, description="the object store for images and "
        "sidecars: file:///path (the embedded default) or s3://bucket/prefix",
    )
    s3_endpoint_url: str | None = Field(
        None, description="an S3-compatible endpoint (MinIO, Ceph): path-style addressing",
    )
    s3_sse: Literal["AES256", "aws:kms"] | None = Field(
        None, description="server-side encryption of every object put",
    )
    s3_kms_key_id: str | None = Field(None, description="the KMS key for s3_sse aws:kms")
    storage_secret: str | None = Field(
        None, description="the server secret keying recipes (cache keys, object names) and "
        "signing links; the same on every replica. Unset: one kept beside a SQLite state "
        "store (a Redis one requires it)",
    )
    cache_scope: Literal["principal", "shared"] = Field(
        "principal", description="whose identical requests are cache hits: the same "
        "principal's only, or everyone's (opt-in: a hit tells a caller someone asked)",
    )
    url_ttl_s: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] = Field(
        3600, description="how long a response_format url link works",
    )
    cdn_base_url: str | None = Field(
        None, description="links as this base + the object's key (a CDN in front of the "
        "bucket; objects carry immutable cache headers) instead of presigned ones",
    )
    c2pa_cert_file: Path | None = Field(
        None, description="PEM certificate chain (leaf first) that signs a C2PA manifest "
        "into every delivered image (the `provenance` extra); with c2pa_key_file",
    )
    c2pa_key_file: Path | None = Field(None, description="its PKCS#8 PEM private key")
    c2pa_alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = \
        Field("es256", description="the signing algorithm of that key")
    batch_max_items: Annotated[int, Field(ge=1, le=100_000)] = Field(
        1000, description="generation requests one batch may hold",
    )
    batch_concurrency: Annotated[int, Field(ge=0, le=64)] = Field(
        2, description="batch items each ingress replica runs at once (0: this replica "
        "runs none)",
    )
    batch_yield_at: Annotated[int, Field(ge=0)] = Field(
        2, description="interactive requests in flight on an ingress replica from which "
        "its batch worker claims nothing more (batch yields to interactive traffic)",
    )
    batch_attempts: Annotated[int, Field(ge=1, le=20)] = Field(
        5, description="attempts of a batch item before it is dead-lettered",
    )
    batch_lease_s: Annotated[float, Field(ge=5, le=3600)] = Field(
        180.0, description="how long a worker holds an item before another may take it "
        "(renewed while it runs)",
    )
    webhook_allowlist: list[str] = Field(
        default_factory=list, description="URL prefixes batch webhooks may call (empty: "
        "no webhooks); internal addresses only where listed exactly",
    )
    webhook_secret: str | None = Field(
        None, description="whsec_... signing batch webhooks (Standard Webhooks); unset: "
        "one kept beside a SQLite state store (a Redis one requires it)",
    )
    image_classifier: str = Field(
        "nudenet", description="stage 9's classifier: nudenet (the `safety` extra), "
        "fixed:CATEGORY=SCORE,... (drills), module:attribute (your own class), or none "
        "(images go out `unchecked`)",
    )
    image_classifier_placement: Literal["deployment", "ingress"] = Field(
        "deployment", description="where it runs: its own Serve deployment (scaled apart "
        "from the model replicas) or a thread in each ingress replica",
    )
    image_classifier_replicas: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="the classifier deployment's replicas (one CPU thread each)",
    )
    image_safety_fail_open: bool = Field(
        False, description="a classifier that cannot run delivers images `unchecked` "
        "instead of failing the request 503 image_safety_unavailable",
    )
    captioner: str | None = Field(
        None, description="module:attribute of a captioner that drafts alt text where the "
        "template has no alt-text pattern (README § Safety)",
    )
    allow_pinning: bool = Field(
        False, description="any caller may pin a models.lock revision (`model`): it alone "
        "serves, no fallback (not yet a per-plan permission)",
    )
    log_requests: bool = Field(False, description="keep Ray Serve's per-request access log")

    @field_validator("identity_header")
    @classmethod
    def _text_header(cls, v: str) -> str:
        if v.lower().endswith("-bin"):
            raise ValueError(f"{v!r} names binary gRPC metadata; a principal is text")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = os.environ.get("IMAGEGEN_CONFIG")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from overrides, env and an optional YAML file; ConfigError if invalid."""
    try:
        if config_file is not None:
            if not Path(config_file).is_file():
                raise ConfigError(f"config file {config_file} does not exist")
            os.environ["IMAGEGEN_CONFIG"] = str(config_file)
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(f"invalid settings: {describe(e)}") from None

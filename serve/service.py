"""The transport-free request path (DESIGN.md stages). Transports call this.

Stages present now: authenticate -> validate -> render the template -> the prompt
policy -> route the tier and resolve the request against its primary (defaults and
limits; every fallback accepts at least as much; a commercial plan keeps only
revisions licensed for it) -> admit (the plan's limits; the principal's share of
this replica; the first revision's room here, else 503 at once) -> reserve the cost
in the budget (a seeded request already stored is answered from the store before
this, at the cache price) -> generate on the first usable revision, failing over ->
image safety (classify, judge, blur or withhold, queue for review) -> price what is
delivered -> post-process and encode -> store (objects, records, sidecars) -> commit
-> answer. Each stage has its span (`stage`) and tells the request's record what it learned
(`annotate`): the log line and the metrics are written once, by the transport.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from .engines.base import Generated, Job
from .errors import (
    CommercialUseForbidden,
    Forbidden,
    GenerationFailed,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    ImageSafetyUnavailable,
    InvalidRequest,
    LimitExceeded,
    ModelTimeout,
    ModelUnavailable,
    NotFound,
    Overloaded,
    PlanLimit,
    PromptBlocked,
    QuotaExceeded,
    StateUnavailable,
    StorageUnavailable,
    Unauthenticated,
    UnknownTemplate,
)
from .imaging import EXTENSION, MIME, blur, encode, encode_png, sizes_for
from .lockfile import Lock, ModelEntry
from .quotas.fairness import InFlight, at_capacity, share_used
from .quotas.idempotency import LEASE_S, Replays, fingerprint
from .quotas.ledger import EPSILON, NEVER_S, Budget, Ledger, Reservation, ceil_s
from .quotas.plans import Plans, PlanSpec, admit, commercially_usable, price
from .quotas.principals import Principal
from .routing import LiveRouting, RoutingTable
from .safety.classifier import Classifying
from .safety.images import UNCHECKED, ImageVerdict, judge
from .safety.policy import LivePolicy
from .safety.review import (
    Appeal,
    Decision,
    FlaggedImage,
    ReviewItem,
    ReviewQueue,
    new_item,
    sha256,
)
from .schemas import (
    MAX_SEED,
    TEMPLATE_REF,
    AltText,
    Deprecation,
    GenerateRequest,
    GenerateResponse,
    Image,
    ImageSafety,
    ModelInfo,
    QuotaStatus,
    Timings,
    validate,
)
from .storage.recipe import Recipe, owner_hash
from .storage.records import ImageRecord, ObjectRecord, new_image_id
from .storage.results import BLURRED, Kept, Results, flight_of
from .telemetry import annotate, current_trace_id, stage
from .templates.library import Template
from .templates.render import Rendered, Styles

log = logging.getLogger("imagegen.service")

# Above this many pixels per request, PNG encoding moves off the event loop.
_ENCODE_INLINE_PIXELS = 256 * 256


class Backend(Protocol):
    """Reaches the model deployments (Serve handles in production, fakes in tests)."""

    async def generate(self, model: str, jobs: list[Job]) -> Generated: ...


class Authenticator(Protocol):
    """Stage 1 (serve/quotas/auth.py)."""

    async def identify(self, headers: Mapping[str, str], peer: str | None) -> Principal: ...

    async def plan_of(self, principal: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """A request resolved against its model: exactly what will be generated."""

    tier: str
    entry: ModelEntry  # the tier's primary (or the pinned revision): its defaults and limits
    jobs: list[Job]
    cost_units: float  # tier weight x work()
    pinned: bool = False  # the request named its revision: it alone serves
    ratios: tuple[str | None, ...] = ()  # per job: the aspect ratio it was sized for

    def megapixels(self) -> float:
        return sum(j.width * j.height for j in self.jobs) / 1e6

    def work(self) -> float:
        """What a cost weight multiplies: the images' megapixels, scaled by their steps
        against the model's default (quality high: 2x the steps, 2x the cost)."""
        return self.megapixels() * self.jobs[0].steps / self.entry.defaults.steps


def _limit(field: str, message: str) -> LimitExceeded:
    return LimitExceeded(message, details=[{"field": field, "type": "limit_exceeded",
                                            "message": message}])


def plan(req: GenerateRequest, lock: Lock, routing: RoutingTable, *,
         may_pin: bool = False) -> Plan:
    """Route the tier and apply its primary's (or the pinned revision's) defaults and
    limits. Pure."""
    primary = routing.route(req.tier).model  # a pinned request still needs its tier open
    entry = lock.get(primary if req.model is None else _pinned(req.model, lock, may_pin))
    d, lim = entry.defaults, entry.limits
    sizes = [req.dimensions() or (d.width, d.height)]
    if req.aspect_ratios:
        try:
            sizes = sizes_for(req.aspect_ratios, req.megapixels or d.width * d.height / 1e6,
                              SIZE_MULTIPLE, lim.min_size, lim.max_width, lim.max_height)
        except ValueError as e:
            raise InvalidRequest(str(e), details=[{"field": "aspect_ratios",
                                                   "type": "invalid"}]) from None
    if len(set(sizes)) < len(sizes):
        raise InvalidRequest(f"aspect_ratios {req.aspect_ratios} give the same size twice",
                             details=[{"field": "aspect_ratios", "type": "duplicate"}])
    for width, height in sizes:
        for side, value, most in (("width", width, lim.max_width),
                                  ("height", height, lim.max_height)):
            if not lim.min_size <= value <= most:
                raise _limit("size", f"{side} {value} is outside {lim.min_size}..{most} for "
                                     f"model {entry.name}")
    steps = req.steps
    if steps is None:
        factor = QUALITY_STEPS[req.quality or "standard"]
        steps = min(lim.max_steps, max(1, round(d.steps * factor)))
    if steps > lim.max_steps:
        raise _limit("steps", f"steps {steps} exceeds {lim.max_steps} for model {entry.name}")
    guidance = d.guidance if req.guidance is None else req.guidance
    if guidance > lim.max_guidance:
        raise _limit("guidance",
                     f"guidance {guidance} exceeds {lim.max_guidance} for model {entry.name}")
    if req.n * len(sizes) > lim.max_images:
        each = f" x {len(sizes)} aspect ratios" if len(sizes) > 1 else ""
        raise _limit("n", f"n {req.n}{each} exceeds {lim.max_images} images for model "
                          f"{entry.name}")
    seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None else req.seed
    # the same seeds at every ratio: one composition, laid out several ways
    jobs = [Job(req.prompt, req.negative_prompt, w, h, steps, guidance,
                (seed + i) % (MAX_SEED + 1)) for w, h in sizes for i in range(req.n)]
    ratios = tuple(r for r in (req.aspect_ratios or [None]) for _ in range(req.n))
    weight = routing.cost_weight(req.tier, entry.name, pinned=req.model is not None)
    p = Plan(req.tier, entry, jobs, 0.0, pinned=req.model is not None, ratios=ratios)
    return replace(p, cost_units=round(weight * p.work(), 6))


def _pinned(model: str, lock: Lock, may_pin: bool) -> str:
    if not may_pin:
        raise Forbidden(f"pinning a revision (model {model!r}) is not allowed here; name a "
                        "tier instead", details=[{"field": "model", "type": "forbidden"}])
    if model not in lock.models:
        raise InvalidRequest(f"model {model!r} is not in models.lock; known: "
                             f"{', '.join(sorted(lock.models))}",
                             details=[{"field": "model", "type": "unknown_model"}])
    return model


# Generated sides are multiples of this (the latent grid of every pipeline served).
SIZE_MULTIPLE = 8

# `quality` as a multiple of the model's default steps (capped at its max_steps).
QUALITY_STEPS = {"low": 0.5, "standard": 1.0, "high": 2.0}

@dataclass(frozen=True, slots=True)
class Delivery:
    """How a request's images are delivered (part of their recipe)."""

    format: str  # png | webp | avif | jpeg
    quality: int | None
    watermark: bool  # the plan's
    c2pa: bool = False  # a signed C2PA manifest besides the XMP mark


def watermarked(image, key: str | None):
    """The plan's watermark: the first 12 bytes of the object's recipe key (its bytes
    are shared by every sidecar of that recipe: each names the key), invisible where
    the image is large enough (256x256), else a visible mark."""
    from .imaging import watermark  # loads OpenCV: only where a plan asks

    if watermark.markable(image):
        return watermark.apply(image, bytes.fromhex(key[:24]) if key else b"imagegen")
    return watermark.visible(image)


_SEVERITY = {"review": 1, "blur": 2, "withhold": 3}
_FORMAT_OF = {ext: fmt for fmt, ext in EXTENSION.items()}
_AS_GENERATED = ("allow", "review", "unchecked")  # delivered unaltered


class Captioner(Protocol):
    """Drafts alt text for images whose template has no alt-text pattern (a raw
    prompt, or a template without one). The `captioner` setting names one."""

    async def caption(self, images: list, prompt: str) -> list[str | None]: ...


# A revision that answered these may serve the request on a retry or elsewhere; bad
# input and the ingress's own overload refusal never are retried.
_RETRYABLE = (ModelUnavailable, GenerationFailed)


class ImageService:
    """Stages 2-12 of the request path for one ingress replica."""

    def __init__(self, lock: Lock, routing: LiveRouting, backend: Backend, *,
                 auth: Authenticator | None = None, plans: Plans | None = None,
                 ledger: Ledger | None = None, may_pin: bool = False,
                 in_flight_per_principal: int = 0,
                 capacity: Mapping[str, int] | None = None,
                 replays: Replays | None = None,
                 idempotency_lease_s: float = LEASE_S,
                 policy: LivePolicy | None = None, styles: Styles | None = None,
                 review: ReviewQueue | None = None, keep_prompts: bool = False,
                 classifier: Classifying | None = None, fail_open: bool = False,
                 captioner: Captioner | None = None, results: Results | None = None,
                 c2pa=None) -> None:
        self.lock = lock
        self.routing = routing
        self.backend = backend
        self.auth = auth
        self.plans = plans
        self.ledger = ledger
        self.fairness = InFlight(in_flight_per_principal, share_used)
        # Requests a revision can hold here (queued + running); beyond it 503 at once.
        self.capacity = InFlight(capacity or {}, at_capacity)
        self.replays = replays
        self.policy = policy  # the prompt policy in force (None: no check)
        self.styles = styles  # the style library (None: raw prompts only)
        self.review = review  # where blocked requests are recorded
        self.keep_prompts = keep_prompts  # a recorded case keeps its prompt text
        self.classifier = classifier  # stage 9 (None: images go out `unchecked`)
        self.fail_open = fail_open  # a failing classifier: deliver unchecked, not 503
        self.captioner = captioner  # drafts alt text where the template has no pattern
        self.results = results  # stages 6 and 11 (None: nothing stored, nothing cached)
        self.c2pa = c2pa  # signs a C2PA manifest into each delivered image (None: XMP only)
        self.batches = None  # serve/batch/jobs.BatchJobs, where batch jobs run
        self.idempotency_lease_s = idempotency_lease_s  # past any request's deadline
        self._orphans: set[asyncio.Task] = set()  # refunds and releases whose caller left
        self.may_pin = may_pin  # any caller may pin a revision (principals: per plan)

    async def authenticate(self, headers: Mapping[str, str],
                           peer: str | None = None) -> Principal:
        """Stage 1: the request's headers (HTTP) or metadata (gRPC) and its peer
        address -> its principal (401 if none). Every transport calls it first, the
        same way."""
        if self.auth is None:
            raise Unauthenticated("this service has no API keys configured")
        with stage("authenticate"):
            principal = await self.auth.identify(headers, peer)
        annotate(principal=principal.name)
        return principal

    async def quota(self, caller: Principal, principal: str | None = None) -> QuotaStatus:
        """The caller's budget now, or with the admin role any principal's (by the plan
        of its first active key)."""
        name = principal or caller.name
        if name != caller.name and not caller.has("admin"):
            raise Forbidden("reading another principal's budget needs the admin role",
                            details=[{"field": "principal", "type": "forbidden"}])
        if self.plans is None or self.ledger is None:
            raise NotFound("this service keeps no budgets")
        plan = caller.plan if name == caller.name else await self.auth.plan_of(name)
        if plan is None:
            raise NotFound(f"principal {name!r} has no active key",
                           details=[{"field": "principal", "type": "not_found"}])
        spec = self.plans.get(plan)
        u = await self.ledger.usage(name, Budget.of(spec))
        return QuotaStatus(principal=name, plan=plan, bucket_units=u.tokens,
                           burst=spec.bucket.burst, refill_per_s=spec.bucket.refill_per_s,
                           credits=u.credits, today_units=u.today,
                           daily_units=spec.daily_units, month_units=u.month, held=u.held)

    def templates(self) -> list[Template]:
        return self.styles.library.all() if self.styles else []

    def template(self, ref: str, caller: Principal | None = None) -> Template:
        """`id` (its newest version that serves the caller) or `id@version`; 422 for
        another."""
        if self.styles is None or not re.fullmatch(TEMPLATE_REF, ref):
            raise UnknownTemplate(f"no template {ref[:80]!r}",
                                  details=[{"field": "template", "type": "unknown_template"}])
        tid, _, version = ref.partition("@")
        if version:
            if (t := self.styles.library.by_id.get(tid, {}).get(int(version))) is None:
                raise UnknownTemplate(f"no template {ref}",
                                      details=[{"field": "template", "type": "unknown_template"}])
            return t
        spec = self.plans.get(caller.plan) if self.plans and caller else None
        return self.styles.resolve(ref, drafts=bool(spec and spec.template_drafts))

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                name=e.name, revision=e.revision, deployment=e.deployment_name,
                pipeline=e.pipeline, dtype=e.dtype, license=e.license,
                commercial_use=e.commercial_use, tiers=self.routing.table.tiers_of(e.name),
                defaults=e.defaults, limits=e.limits,
            )
            for e in self.lock.models.values()
        ]

    async def generate(self, req: GenerateRequest, request_id: str,
                       principal: Principal | None = None,
                       idempotency_key: str | None = None) -> GenerateResponse:
        if idempotency_key is not None and principal is not None and self.replays is not None:
            return await self._once(req, request_id, principal, idempotency_key)
        t0 = time.perf_counter()
        table = self.routing.table  # one document for the whole request
        spec = self.plans.get(principal.plan) if self.plans and principal else None
        r = self._render(req, spec)
        await self._check_prompt(req.tier, r, spec, request_id, principal)
        with stage("route", **{"imagegen.tier": req.tier}) as span:
            p = plan(req.model_copy(update={"prompt": r.prompt,
                                            "negative_prompt": r.negative_prompt}),
                     self.lock, table, may_pin=self.may_pin)
            order = self._order(p, spec)
            span.set_attributes({"gen_ai.request.model": p.entry.name,
                                 "imagegen.revision": p.entry.revision})
        annotate(tier=p.tier, model=p.entry.name, revision=p.entry.revision, images=len(p.jobs))
        if p.pinned:
            annotate(pinned=True)
        if spec is not None:
            with stage("admit"):
                admit(principal.plan, spec, tier=p.tier, n=len(p.jobs),
                      megapixels=p.megapixels(), raw_prompt=r.template is None)
        if req.response_format == "url" and self.results is None:
            raise InvalidRequest("response_format url needs an object store; ask for b64_json",
                                 details=[{"field": "response_format", "type": "unsupported"}])
        fmt = Delivery(req.output_format, req.output_quality, bool(spec and spec.watermark),
                       c2pa=self.c2pa is not None and self.c2pa.supports(MIME[req.output_format]))
        scope = self.results.scope(principal.name if principal else None) \
            if self.results else None
        likely = self.lock.get(self.routing.likely(order))
        recipes = self._recipes(p, likely, r, fmt)
        hit, flight = await self._cached(recipes, scope, spec, req) if req.seed is not None \
            else (None, None)
        if hit is not None:  # stage 6: no model, the plan's cache price
            return await self._from_cache(hit, recipes, likely, p, r, req, spec, principal,
                                          request_id, fmt, t0)
        with (self.results.lead(flight) if flight else contextlib.nullcontext(),
              self.fairness.hold(principal.name if principal else None),
              self.capacity.hold(self.routing.likely(order))):
            reservation = None
            if spec is not None and self.ledger is not None:
                reservation = await self._reserve(principal, spec, p)
            try:
                out, e, fallback = await self._generate(p, order, table)
                verdicts = await self._check_images(out, p, r, req, spec, request_id,
                                                    principal)
                served = self._recipes(p, e, r, fmt)
                keys = self._keys(served, scope, verdicts)
                cost, encoded = await self._deliver(out, verdicts, p, e, table, fmt, keys)
                alts = await self._alt_texts(out, r, verdicts)
                ids = [new_image_id() for _ in p.jobs] if self.results else [None] * len(p.jobs)
                urls = await self._store(served, keys, ids, encoded, verdicts, alts, cost, p, e,
                                         r, req, spec, principal, request_id, fmt,
                                         out) if self.results else None
            except BaseException:
                if reservation is not None:  # failed, blocked or cancelled: nothing charged
                    await asyncio.shield(self._settle(reservation, 0.0, spec))
                raise
            charged = await self._charge(reservation, cost, spec, principal)
        images = [
            Image(id=image_id, seed=j.seed, width=j.width, height=j.height, aspect_ratio=ratio,
                  mime_type=MIME[fmt.format],
                  b64_json=None if data is None or req.response_format == "url"
                  else base64.b64encode(data).decode(),
                  url=url if data is not None else None,
                  alt_text=alt, safety=ImageSafety(action=v.action, category=v.category,
                                                   review_id=review_id))
            for j, ratio, data, alt, (v, review_id), image_id, url in zip(
                p.jobs, p.ratios, encoded, alts, verdicts, ids, urls or [None] * len(p.jobs),
                strict=True)
        ]
        return self._response(request_id, p, e, fallback, out.batch_images, cost, charged,
                              images, r, out.queue_s, out.generate_s, t0)

    def _response(self, request_id: str, p: Plan, e: ModelEntry, fallback: bool,
                  batch_images: int, cost: float, charged: float | None, images: list[Image],
                  r: Rendered, queue_s: float, generate_s: float, t0: float,
                  cached: bool = False) -> GenerateResponse:
        t = r.template
        return GenerateResponse(
            id=request_id, trace_id=current_trace_id(), created=int(time.time()), tier=p.tier,
            model=e.name, revision=e.revision, fallback=fallback, pinned=p.pinned,
            batch_images=batch_images, cost_units=cost, price=charged, images=images,
            cached=cached, template=t.ref if t else None,
            template_deprecation=Deprecation(successor=t.successor, sunset=t.deprecated_on)
            if t and t.status == "deprecated" else None,
            timings=Timings(queue_ms=queue_s * 1e3, generate_ms=generate_s * 1e3,
                            total_ms=(time.perf_counter() - t0) * 1e3),
        )

    # Stages 6 and 11: the cache and the store.

    def _recipes(self, p: Plan, e: ModelEntry, r: Rendered, fmt: Delivery) -> list[Recipe]:
        return [Recipe(revision=f"{e.name}@{e.revision}", template=r.template.ref
                       if r.template else None, prompt=j.prompt,
                       negative_prompt=j.negative_prompt, seed=j.seed, width=j.width,
                       height=j.height, steps=j.steps, guidance=j.guidance,
                       scheduler="revision", output_format=fmt.format, quality=fmt.quality,
                       watermark=fmt.watermark, c2pa=fmt.c2pa) for j in p.jobs]

    async def _cached(self, recipes: list[Recipe], scope: str | None, spec: PlanSpec | None,
                      req: GenerateRequest) -> tuple[list | None, str | None]:
        """Stage 6: every image of this request already stored for this scope, still
        judged as it was delivered: (records, None); else (None, the flight to lead).
        An identical request generating here is waited for, then looked up again."""
        if self.results is None:
            return None, None
        keys = [rc.key(self.results.secret, scope) for rc in recipes]
        ext = EXTENSION[recipes[0].output_format]
        flight = flight_of(scope, keys)
        with stage("cache") as span:
            for attempt in range(2):
                records = await self.results.lookup(keys, [ext] * len(keys))
                if records is not None and (records := self._rejudged(records, spec, req)):
                    span.set_attribute("imagegen.cache_hit", True)
                    return list(zip(keys, records, strict=True)), None
                if attempt or not await self.results.wait_for_flight(flight):
                    break
            # A follower whose leader kept nothing generates alone, without leading.
            return None, None if attempt else flight

    def _rejudged(self, records: list[ObjectRecord], spec: PlanSpec | None,
                  req: GenerateRequest) -> list[ObjectRecord] | None:
        """The stored images as the policy in force (this plan's profile, this
        moderation level) judges them, if it still delivers each as generated (allow
        or review); else None: a stricter threshold or another classifier makes a
        miss, generated and judged anew."""
        if self.classifier is None:
            return records if all(r.action == "unchecked" for r in records) else None
        if any(r.scores is None for r in records):
            return None  # kept unchecked (fail open): classify it now
        now = [r.model_copy(update={"action": self._judged(r.scores, spec, req).action})
               for r in records]
        return now if all(r.action in ("allow", "review") for r in now) else None

    def _judged(self, scores: dict[str, float], spec: PlanSpec | None,
                req: GenerateRequest) -> ImageVerdict:
        if self.policy is None:
            return ImageVerdict("allow", scores=scores)
        policy = self.policy.policy
        rules = policy.image_rules(spec.safety_profile if spec else "default", req.moderation)
        return judge(scores, rules, policy.always)

    def _keys(self, recipes: list[Recipe], scope: str | None, verdicts) -> list[str | None]:
        """Each image's name in the store: its recipe key, or for a blurred image the
        key beside it (never a hit; never the unblurred bytes behind a blur)."""
        if self.results is None:
            return [None] * len(recipes)
        return [rc.key(self.results.secret, scope) + (BLURRED if v.action == "blur" else "")
                for rc, (v, _) in zip(recipes, verdicts, strict=True)]

    async def _charge(self, reservation, cost: float, spec: PlanSpec | None,
                      principal: Principal | None) -> float | None:
        """Settle a served request's reservation at `cost`; the price charged (None:
        no budget, or the store failed and it went unsettled)."""
        if reservation is None:
            return None
        charged = await self._settle(reservation, cost, spec)
        if cost:  # every image withheld: refunded, nothing to count
            annotate(price=charged, quota={
                "plan": principal.plan, "units": cost, "reason": "ok",
                "outcome": "charged" if charged is not None else "unsettled"})
        return charged

    async def _from_cache(self, hit, recipes: list[Recipe], e: ModelEntry, p: Plan,
                          r: Rendered, req: GenerateRequest, spec: PlanSpec | None,
                          principal: Principal | None, request_id: str, fmt: Delivery,
                          t0: float) -> GenerateResponse:
        annotate(cache_hit=True, model=e.name, revision=e.revision)
        weight = self.routing.table.cost_weight(p.tier, e.name, pinned=p.pinned)
        cost = round(weight * p.work() * (spec.cache_hit_fraction if spec else 1.0), 6)
        reservation = None
        if spec is not None and self.ledger is not None:
            reservation = await self._reserve(principal, spec, replace(p, cost_units=cost))
        try:
            ids = [new_image_id() for _ in p.jobs]
            ext = EXTENSION[fmt.format]
            datas = await asyncio.gather(*(self.results.content(k, ext) for k, _ in hit)) \
                if req.response_format == "b64_json" else [b""] * len(hit)
            if any(d is None for d in datas):
                raise StorageUnavailable("a cached image went missing; retry")
            verdicts = [(ImageVerdict(rec.action), None) for _, rec in hit]
            urls = [self.results.url(k, ext) if req.response_format == "url" else None
                    for k, _ in hit]
            alts = [AltText(text=r.alt_text, source="template") if r.alt_text else None] * len(hit)
            with stage("store", **{"imagegen.images": len(hit)}):
                await self.results.put_sidecars([
                    self._sidecar(i, k, rec.mime_type, ext, j, ratio, rc, v, alt, cost / len(hit),
                                  p, e, r, req, spec, principal, request_id, cached=True)
                    for i, (k, rec), j, ratio, rc, (v, _), alt in zip(
                        ids, hit, p.jobs, p.ratios, recipes, verdicts, alts, strict=True)])
        except BaseException:
            if reservation is not None:
                await asyncio.shield(self._settle(reservation, 0.0, spec))
            raise
        charged = await self._charge(reservation, cost, spec, principal)
        annotate(cost_units=cost, images=len(hit))
        images = [
            Image(id=i, seed=j.seed, width=j.width, height=j.height, aspect_ratio=ratio,
                  mime_type=rec.mime_type,
                  b64_json=base64.b64encode(d).decode() if req.response_format == "b64_json"
                  else None,
                  url=url, alt_text=alt, safety=ImageSafety(action=rec.action))
            for i, (_, rec), j, ratio, d, alt, url in zip(ids, hit, p.jobs, p.ratios, datas,
                                                          alts, urls, strict=True)]
        return self._response(request_id, p, e, False, 0, cost, charged, images, r, 0.0, 0.0,
                              t0, cached=True)

    async def _store(self, recipes: list[Recipe], keys: list[str], ids: list[str],
                     encoded: list[bytes | None], verdicts, alts, cost: float, p: Plan,
                     e: ModelEntry, r: Rendered, req: GenerateRequest, spec: PlanSpec | None,
                     principal: Principal | None, request_id: str, fmt: Delivery,
                     out: Generated) -> list[str | None]:
        """Stage 11: each delivered image once per recipe key (object, then its
        record), then every image's sidecar (its own id, owner and retention). A store
        that fails is 503 storage_unavailable and, the caller refunding, costs nothing.
        The URLs, for response_format url."""
        ext, mime = EXTENSION[fmt.format], MIME[fmt.format]
        delivered = sum(d is not None for d in encoded)
        share = cost / delivered if delivered else 0.0
        now = dt.datetime.now(dt.UTC)
        with stage("store", **{"imagegen.images": len(ids)}):
            await self.results.keep([
                Kept(k, ext, mime, data, ObjectRecord(
                    mime_type=mime, width=j.width, height=j.height, bytes=len(data),
                    scores=v.scores, action=v.action, created=now))
                for k, data, j, (v, _) in zip(keys, encoded, p.jobs, verdicts, strict=True)
                if data is not None], [
                self._sidecar(i, k if data is not None else None, mime, ext, j, ratio, rc, v,
                              alt, share if data is not None else 0.0, p, e, r, req, spec,
                              principal, request_id, review_id=review_id,
                              timings={"queue_ms": out.queue_s * 1e3,
                                       "generate_ms": out.generate_s * 1e3})
                for i, k, data, j, ratio, rc, (v, review_id), alt in zip(
                    ids, keys, encoded, p.jobs, p.ratios, recipes, verdicts, alts,
                    strict=True)])
        if req.response_format != "url":
            return [None] * len(ids)
        return [self.results.url(k, ext) for k in keys]

    def _sidecar(self, image_id: str, key: str | None, mime: str, ext: str, j: Job,
                 ratio: str | None, recipe: Recipe, v: ImageVerdict, alt: AltText | None,
                 cost: float, p: Plan, e: ModelEntry, r: Rendered, req: GenerateRequest,
                 spec: PlanSpec | None, principal: Principal | None, request_id: str, *,
                 review_id: str | None = None, cached: bool = False,
                 timings: dict | None = None) -> ImageRecord:
        now = dt.datetime.now(dt.UTC)
        days = spec.retention_days if spec else None
        request = req.model_dump(mode="json", exclude_none=True, exclude={
            "seed", "n", "size", "aspect_ratios", "megapixels"})
        if v.restricted:  # the always-on category: the texts as hashes, as its case has
            recipe = recipe.model_copy(update={"prompt": sha256(recipe.prompt),
                                               "negative_prompt": sha256(recipe.negative_prompt)})
            request = {k: x for k, x in request.items()
                       if k not in ("prompt", "negative_prompt", "variables")}
        return ImageRecord(
            id=image_id, request_id=request_id, created=now,
            expires=now + dt.timedelta(days=days) if days else None,
            owner=owner_hash(self.results.secret, principal.name if principal else "anonymous"),
            key=key, ext=ext, mime_type=mime, width=j.width, height=j.height,
            aspect_ratio=ratio, seed=j.seed, tier=p.tier, model=e.name, revision=e.revision,
            template=r.template.ref if r.template else None, recipe=recipe,
            request=request,
            approval_id=req.approval_id,
            safety=ImageSafety(action=v.action, category=v.category, review_id=review_id),
            alt_text=alt, cost_units=round(cost, 6), cached=cached, timings=timings or {})

    def _render(self, req: GenerateRequest, spec: PlanSpec | None) -> Rendered:
        """Stage 3: the request's template and variables -> its prompts (a raw prompt
        as it is)."""
        if req.template is None:
            return Rendered(req.prompt or "", req.negative_prompt)
        if self.styles is None:
            raise UnknownTemplate("this service has no style library",
                                  details=[{"field": "template", "type": "unknown_template"}])
        with stage("render", **{"imagegen.template": req.template}):
            r = self.styles.render(req, drafts=bool(spec and spec.template_drafts))
        annotate(template=r.template.ref)
        return r

    async def _check_prompt(self, tier: str, r: Rendered, spec: PlanSpec | None,
                            request_id: str, principal: Principal | None) -> None:
        """Stage 4: the prompt policy on every string variable, the rendered prompt and
        the negative prompt, under the plan's safety profile, before anything is
        reserved or routed. A block is recorded in the review queue."""
        if self.policy is None:
            return
        texts = {f"variables.{k}": v for k, v in (r.values or {}).items()}
        texts |= {"prompt": r.prompt, "negative_prompt": r.negative_prompt}
        with stage("policy"):
            try:
                self.policy.check(texts, spec.safety_profile if spec else "default")
            except PromptBlocked as e:
                # the tier is not routed yet: a label only for one the table knows
                annotate(tier=tier if tier in self.routing.table.tiers else "unknown",
                         blocked={"stage": "prompt_safety", "reason": e.reason,
                                  "category": e.category})
                if self.review is not None:  # the store down: still blocked, and logged
                    await self._finish(self.review.add(self._case(e, r, request_id, principal)))
                raise

    def _case(self, e: PromptBlocked, r: Rendered, request_id: str,
              principal: Principal | None) -> ReviewItem:
        restricted = e.category in self.policy.policy.always
        return new_item(
            stage="prompt_safety", category=e.category, reason=e.reason,
            field=e.details[0]["field"], principal=principal.name if principal else "anonymous",
            request_id=request_id, template=r.template.ref if r.template else None,
            prompt_sha256=sha256(r.prompt), negative_prompt_sha256=sha256(r.negative_prompt),
            # a restricted case keeps hashes only: evidence, never a text to show
            prompt=r.prompt if self.keep_prompts and not restricted else None,
            restricted=restricted)

    # The review queue (reviewer role; restricted cases: admin).

    def _reviewer(self, caller: Principal, restricted: bool) -> ReviewQueue:
        if self.review is None:
            raise NotFound("this service keeps no review queue")
        need = "admin" if restricted else "reviewer"
        if not caller.has(need):
            raise Forbidden(f"the review queue needs the {need} role"
                            + (" for restricted cases" if restricted else ""),
                            details=[{"field": "role", "type": "forbidden"}])
        return self.review

    async def review_list(self, caller: Principal, status: str | None = "open",
                          restricted: bool = False) -> list[ReviewItem]:
        return await self._reviewer(caller, restricted).list(status, restricted=restricted)

    async def review_item(self, caller: Principal, item_id: str) -> ReviewItem:
        item = await self._reviewer(caller, False).get(item_id)
        if item is None:
            raise NotFound(f"no review item {item_id[:40]!r}")
        self._reviewer(caller, item.restricted)
        return item

    async def review_evidence(self, caller: Principal, item_id: str, index: int) -> bytes:
        """The unblurred PNG of an image case's image `index`, under its case's roles."""
        await self.review_item(caller, item_id)
        png = await self.review.evidence(item_id, index)
        if png is None:
            raise NotFound(f"review item {item_id[:40]!r} keeps no image {index}",
                           details=[{"field": "index", "type": "not_found"}])
        return png

    async def review_decide(self, caller: Principal, item_id: str, decision: str,
                            reason: str) -> ReviewItem:
        await self.review_item(caller, item_id)
        d = Decision(decision=decision, reason=reason, by=caller.name,
                     at=dt.datetime.now(dt.UTC))
        item = await self.review.decide(item_id, d)
        annotate(review={"decision": decision, "reason": reason})
        return item

    # Batch jobs (serve/batch): items checked at submission, run later as requests.

    async def preflight(self, req: GenerateRequest, principal: Principal) -> None:
        """What a batch item must pass when its batch is submitted: its template, the
        prompt policy (a block is recorded as for a request), routing, the model's and
        the plan's limits. The budget pays per item, when it runs."""
        spec = self.plans.get(principal.plan) if self.plans else None
        r = self._render(req, spec)
        await self._check_prompt(req.tier, r, spec, "batch-submit", principal)
        p = plan(req.model_copy(update={"prompt": r.prompt, "negative_prompt": r.negative_prompt}),
                 self.lock, self.routing.table, may_pin=self.may_pin)
        self._order(p, spec)
        if spec is not None:
            admit(principal.plan, spec, tier=p.tier, n=len(p.jobs), megapixels=p.megapixels(),
                  raw_prompt=r.template is None)

    def _jobs(self):
        if self.batches is None:
            raise NotFound("this service runs no batch jobs")
        return self.batches

    async def submit_batch(self, caller: Principal, body):
        return await self._jobs().submit(caller, body)

    async def submit_batch_jsonl(self, caller: Principal, raw: bytes, options: dict):
        return await self._jobs().submit_jsonl(caller, raw, options)

    async def batch(self, caller: Principal, batch_id: str):
        return await self._jobs().view(caller, batch_id)

    async def my_batches(self, caller: Principal):
        return await self._jobs().mine(caller)

    async def cancel_batch(self, caller: Principal, batch_id: str):
        return await self._jobs().cancel(caller, batch_id)

    async def batch_results(self, caller: Principal, batch_id: str):
        return await self._jobs().results(caller, batch_id)

    async def run_item(self, item, owner: str) -> dict:
        """One batch item as its owner's request: every stage, under an
        Idempotency-Key of its item id (a retry after a lost answer is charged once)."""
        plan_name = await self.auth.plan_of(owner) if self.auth else None
        if self.auth is not None and plan_name is None:
            raise Forbidden(f"principal {owner!r} has no active key any more")
        principal = Principal(name=owner, roles=frozenset({"user"}),
                              plan=plan_name or "default")
        try:
            resp = await self.generate(validate(GenerateRequest, item.request), item.id,
                                       principal, idempotency_key=f"batch:{item.id}")
        except IdempotencyInProgress:  # an earlier attempt (a dead worker's) still holds it
            raise Overloaded(f"an earlier attempt of {item.id} is still running") from None
        return {"images": [i.id for i in resp.images], "seeds": [i.seed for i in resp.images],
                "revision": resp.revision, "model": resp.model, "cost_units": resp.cost_units,
                "cached": resp.cached,
                "withheld": sum(i.safety.action == "withhold" for i in resp.images)}

    # Stored images: the owner's (or an admin's) alone; anyone else's is "not found".

    async def image(self, caller: Principal, image_id: str) -> tuple[ImageRecord, str | None]:
        """An image's sidecar and a URL for its bytes (None if withheld)."""
        record = await self._owned(caller, image_id)
        return record, self.results.url(record.key, record.ext) if record.key else None

    async def reroll(self, caller: Principal, image_id: str, request_id: str,
                     seed: int | None = None) -> GenerateResponse:
        """The image's request again, one image at its size, with a new seed (drawn,
        or the one given): every stage runs (policy, quota, safety, cache) as for a
        new request."""
        record = await self._owned(caller, image_id)
        fields = {**record.request, "n": 1, "size": f"{record.width}x{record.height}"}
        if seed is not None:
            fields["seed"] = seed
        annotate(reroll_of=image_id)
        return await self.generate(validate(GenerateRequest, fields), request_id, caller)

    async def file(self, path: str, expires: int, sig: str) -> tuple[bytes, str]:
        """A signed /v1/files URL's bytes and type (the local store's delivery)."""
        if self.results is None or not self.results.signed(path, expires, sig):
            raise NotFound("no such file, or its link has expired")
        data = await self.results.file(path)
        if data is None:
            raise NotFound("no such file, or its link has expired")
        return data, MIME.get(_FORMAT_OF.get(path.rsplit(".", 1)[-1], ""),
                              "application/octet-stream")

    async def _owned(self, caller: Principal, image_id: str) -> ImageRecord:
        if self.results is None:
            raise NotFound("this service keeps no images")
        missing = NotFound(f"no image {image_id[:40]!r}",
                           details=[{"field": "id", "type": "not_found"}])
        if not re.fullmatch(r"img_[0-9a-f]{24}", image_id):
            raise missing
        record = await self.results.sidecar(image_id)
        if record is None or (record.owner != owner_hash(self.results.secret, caller.name)
                              and not caller.has("admin")):
            raise missing  # another principal's image is not there, for this caller
        return record

    async def appeal(self, caller: Principal, request_id: str, message: str) -> ReviewItem:
        """The blocked caller's appeal joins its case in the queue."""
        if self.review is None:
            raise NotFound("this service keeps no review queue")
        item = await self.review.appeal(request_id, Appeal(
            at=dt.datetime.now(dt.UTC), principal=caller.name, message=message))
        if item is None:
            raise NotFound(f"no blocked request {request_id[:64]!r} of yours",
                           details=[{"field": "request_id", "type": "not_found"}])
        return item

    async def _once(self, req: GenerateRequest, request_id: str, principal: Principal,
                    key: str) -> GenerateResponse:
        """Stage 2b: a request under an Idempotency-Key runs once; a retry with the same
        body gets the first answer (`replayed`), charged nothing."""
        # The claim's owner is this call's own token, never the request id (a caller
        # may choose that, and a retry that resends it would pass for the first).
        owner = secrets.token_hex(16)
        with stage("idempotency"):
            call = asyncio.ensure_future(self.replays.claim(
                principal.name, key, fingerprint(req.model_dump_json()), owner,
                self.idempotency_lease_s))
            try:
                claim = await asyncio.shield(call)
            except asyncio.CancelledError:
                # The caller left while the store answered: a claim it got goes back.
                call.add_done_callback(lambda c: self._release_orphan(c, principal, key, owner))
                raise
        if claim.state == "done":
            first = GenerateResponse.model_validate_json(claim.answer)
            annotate(tier=first.tier, model=first.model, revision=first.revision,
                     images=len(first.images), replayed=True)  # delivered again, not charged
            return first.model_copy(update={"replayed": True})
        if claim.state == "mismatch":
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with another request; use a new key per "
                "request", details=[{"field": "Idempotency-Key", "type": "reused"}])
        if claim.state == "running":
            raise IdempotencyInProgress("a request with this Idempotency-Key is still "
                                        "running; retry shortly for its answer")
        try:
            resp = await self.generate(req, request_id, principal)
        except BaseException:
            await self._finish(self.replays.release(principal.name, key, owner))
            raise
        # Served and charged: the answer goes out even if it cannot be kept (logged;
        # then retries are 409 until the claim's lease ends, and one after runs again).
        await self._finish(self.replays.complete(principal.name, key, owner,
                                                 resp.model_dump_json()))
        return resp

    def _release_orphan(self, call: asyncio.Future, principal: Principal, key: str,
                        owner: str) -> None:
        if not call.cancelled() and call.exception() is None and call.result().state == "new":
            self._later(self.replays.release(principal.name, key, owner))

    def _later(self, call) -> asyncio.Task:
        """Run a bookkeeping call to its end even if the caller leaves; a failure is
        logged (the store down: a refund's hold, a claim's lease expires instead)."""
        task = asyncio.ensure_future(call)
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)
        task.add_done_callback(_logged)
        return task

    async def _finish(self, call) -> bool:
        """Await a bookkeeping call; it ends even if this request is cancelled. Whether
        it succeeded."""
        task = self._later(call)
        # A store that fails is logged by _later's callback: bookkeeping never fails a
        # request. A cancellation still propagates.
        await asyncio.wait([task])  # not cancelled with this request: it ends regardless
        return not task.cancelled() and task.exception() is None

    async def _generate(self, p: Plan, order: list[str], table: RoutingTable):
        """Stage 8: generate on the first usable revision. (out, revision served,
        fallback?)"""
        with stage("generate", **_genai_attributes(p)) as span:
            out, e = await self._failover(p, order)
            # a canary is no fallback; a pinned revision serves as itself
            fallback = not p.pinned and e.name in table.tiers[p.tier].fallbacks
            span.set_attributes({"imagegen.batch_images": out.batch_images,
                                 "imagegen.queue_ms": out.queue_s * 1e3,
                                 "imagegen.fallback": fallback, "imagegen.served_by": e.name})
        annotate(model=e.name, revision=e.revision, fallback=fallback,
                 queue_ms=out.queue_s * 1e3, generate_ms=out.generate_s * 1e3)
        return out, e, fallback

    async def _check_images(self, out: Generated, p: Plan, r: Rendered, req: GenerateRequest,
                            spec: PlanSpec | None, request_id: str,
                            principal: Principal | None) -> list[tuple[ImageVerdict, str | None]]:
        """Stage 9: every image classified before it is delivered and judged by the
        plan's safety profile (and the request's moderation level); flagged images are
        one case in the review queue, with their unblurred PNGs as evidence. A
        classifier that cannot run fails the request (503, nothing charged) unless
        fail_open is set. (verdict, review id) per image."""
        n = len(out.images)
        if self.classifier is None:
            annotate(image_safety={"unchecked": n, "classifier": "none"})
            return [(UNCHECKED, None)] * n
        with stage("image_safety", **{"imagegen.images": n}) as span:
            try:
                scores = await self.classifier.classify(out.images)
            except Exception as e:  # noqa: BLE001 - the deployment down, the model failing
                log.warning("image classifier %s failed: %s", self.classifier.name, e)
                if self.fail_open:  # delivered unchecked: counted apart (an alert's)
                    annotate(image_safety={"unchecked": n, "error": type(e).__name__})
                    return [(UNCHECKED, None)] * n
                annotate(image_safety={"error": type(e).__name__})
                raise ImageSafetyUnavailable(
                    "the image classifier is unavailable; images are not delivered "
                    "unchecked. Retry shortly") from None
            policy = self.policy.policy if self.policy else None
            profile = spec.safety_profile if spec else "default"
            rules = policy.image_rules(profile, req.moderation) if policy else {}
            always = policy.always if policy else frozenset()
            verdicts = [replace(judge(s, rules, always), scores=s) for s in scores]
            if restricted := next((v for v in verdicts if v.restricted), None):
                # one image of the always-on category: none of the request's goes out
                verdicts = [v if v.action == "withhold" else ImageVerdict(
                    "withhold", restricted.category, s.get(restricted.category, 0.0),
                    restricted=True, scores=s) for v, s in zip(verdicts, scores, strict=True)]
            span.set_attributes({"imagegen.image_actions": [v.action for v in verdicts]})
        flagged = [(i, v) for i, v in enumerate(verdicts) if v.action != "allow"]
        facts: dict = {"classifier": self.classifier.name, "allow": n - len(flagged)}
        if flagged:
            worst = max(flagged, key=lambda f: (f[1].restricted, _SEVERITY[f[1].action]))[1]
            facts["flagged"] = [{"action": v.action, "category": v.category,
                                 "reason": policy.reason_of(v.category)} for _, v in flagged]
            if worst.action in ("blur", "withhold"):
                annotate(blocked={"stage": "image_safety",
                                  "reason": policy.reason_of(worst.category),
                                  "category": worst.category})
        annotate(image_safety=facts)
        if not flagged or self.review is None:
            return [(v, None) for v in verdicts]
        item, evidence = await asyncio.to_thread(
            self._image_case, flagged, scores, out, r, request_id, principal)
        # the store down: logged, and the images carry no case id to appeal with
        kept = await self._finish(self.review.add(item, evidence))
        if not kept:
            annotate(review_unrecorded=True)
        return [(v, item.id if kept and v.action != "allow" else None) for v in verdicts]

    def _image_case(self, flagged: list[tuple[int, ImageVerdict]], scores, out: Generated,
                    r: Rendered, request_id: str, principal: Principal | None):
        policy = self.policy.policy
        restricted = any(v.restricted for _, v in flagged)
        worst = max(flagged, key=lambda f: (f[1].restricted, _SEVERITY[f[1].action]))[1]
        evidence = {i: encode_png(out.images[i]) for i, _ in flagged}
        shots = [FlaggedImage(index=i, action=v.action, category=v.category, score=v.score,
                              scores=scores[i], sha256=hashlib.sha256(evidence[i]).hexdigest(),
                              width=out.images[i].shape[1], height=out.images[i].shape[0])
                 for i, v in flagged]
        item = new_item(
            kind="image", stage="image_safety", category=worst.category,
            reason=policy.reason_of(worst.category), field="images",
            principal=principal.name if principal else "anonymous", request_id=request_id,
            template=r.template.ref if r.template else None,
            prompt_sha256=sha256(r.prompt), negative_prompt_sha256=sha256(r.negative_prompt),
            prompt=r.prompt if self.keep_prompts and not restricted else None,
            restricted=restricted, images=shots, classifier=self.classifier.name)
        return item, evidence

    async def _deliver(self, out: Generated, verdicts, p: Plan, e: ModelEntry,
                       table: RoutingTable, fmt: Delivery,
                       keys: list[str | None]) -> tuple[float, list[bytes | None]]:
        """Stage 10: the price of what is delivered (a withheld image costs nothing),
        and the delivered images post-processed (blurred where judged so; watermarked
        where the plan says, with the object's key, which its sidecars name) and
        encoded."""
        delivered = [v.action != "withhold" for v, _ in verdicts]
        annotate(images=sum(delivered))  # imagegen_images_total: what went out
        weight = table.cost_weight(p.tier, e.name, pinned=p.pinned)
        pixels = [j.width * j.height for j in p.jobs]
        shown = sum(px for px, keep in zip(pixels, delivered, strict=True) if keep)
        cost = round(weight * p.work() * shown / sum(pixels), 6)
        annotate(cost_units=cost)

        def post(i: int):
            if not delivered[i]:
                return None
            image = blur(out.images[i]) if verdicts[i][0].action == "blur" else out.images[i]
            if fmt.watermark:
                image = watermarked(image, keys[i])
            data = encode(image, fmt.format, fmt.quality)
            return self.c2pa.sign(data, MIME[fmt.format]) if fmt.c2pa else data

        with stage("encode", **{"imagegen.images": sum(delivered),
                                "imagegen.format": fmt.format}):
            if sum(pixels) > _ENCODE_INLINE_PIXELS or fmt.watermark or fmt.format != "png":
                encoded = await asyncio.to_thread(lambda: [post(i) for i in range(len(pixels))])
            else:
                encoded = [post(i) for i in range(len(pixels))]
        return cost, encoded

    async def _alt_texts(self, out: Generated, r: Rendered, verdicts) -> list[AltText | None]:
        """A drafted alt text per image (needs_review): the template's pattern, else the
        captioner's, never for a withheld image."""
        if r.alt_text:
            texts = [r.alt_text] * len(out.images)
            source = "template"
        elif self.captioner is not None:
            # only images delivered as generated: a caption of a blurred one would
            # describe what the blur hides
            shown = [i for i, (v, _) in enumerate(verdicts) if v.action in _AS_GENERATED]
            with stage("caption"):
                try:
                    drafts = await self.captioner.caption([out.images[i] for i in shown],
                                                          r.prompt) if shown else []
                    if len(drafts) != len(shown):
                        raise ValueError(f"{len(drafts)} captions for {len(shown)} images")
                except Exception as e:  # noqa: BLE001 - a draft is optional; the images are not
                    log.warning("captioner failed: %s", e)
                    drafts = [None] * len(shown)
            texts = [None] * len(out.images)
            for i, t in zip(shown, drafts, strict=True):
                texts[i] = t if isinstance(t, str) and t.strip() else None
            source = "captioner"
        else:
            return [None] * len(out.images)
        return [AltText(text=t, source=source) if t and v.action != "withhold" else None
                for t, (v, _) in zip(texts, verdicts, strict=True)]

    async def _reserve(self, principal: Principal, spec: PlanSpec, p: Plan) -> Reservation:
        """Stage 7: the request's cost units out of the principal's budget, before any
        GPU work; QuotaExceeded (429, with when to retry) if it cannot pay now."""
        budget = Budget.of(spec)
        with stage("reserve", **{"imagegen.cost_units": p.cost_units}):
            call = asyncio.ensure_future(self.ledger.reserve(principal.name, p.cost_units,
                                                             budget))
            try:
                got = await asyncio.shield(call)
            except asyncio.CancelledError:
                # The caller left while the store answered: whatever it reserved goes back.
                call.add_done_callback(self._refund_orphan)
                raise
        if got.reservation is not None:
            return got.reservation
        annotate(quota={"plan": principal.plan, "units": p.cost_units, "outcome": "rejected",
                        "reason": got.reason})
        cap = budget.daily if got.reason == "daily" else budget.burst
        never_fits = (p.cost_units > cap + EPSILON if got.reason == "daily"
                      else budget.refill_per_s > 0 and got.retry_after_s >= NEVER_S)
        if never_fits:
            # Waiting never helps: the request costs more than the plan's whole budget.
            raise PlanLimit(f"{p.cost_units:g} cost units exceed plan {principal.plan!r}'s "
                            f"{'daily cap' if got.reason == 'daily' else 'burst'} of {cap:g}; "
                            "ask for fewer or smaller images, or fewer steps",
                            details=[{"field": "n", "type": "plan_limit"}])
        window = budget.burst / budget.refill_per_s if budget.refill_per_s > 0 else 86400
        limit, left, reset = (budget.burst, got.remaining, got.reset_s)
        if got.reason == "daily":
            limit, window, left, reset = budget.daily, 86400, 0.0, got.retry_after_s
        raise QuotaExceeded(
            f"plan {principal.plan!r}: {p.cost_units:g} cost units do not fit the "
            f"{'daily cap' if got.reason == 'daily' else 'budget'} now; retry in "
            f"{ceil_s(got.retry_after_s)} s", retry_after_s=ceil_s(got.retry_after_s),
            ratelimit={"policy": got.reason, "limit": limit, "window": window,
                       "remaining": left, "reset": reset},
            details=[{"field": "budget", "type": got.reason}])

    def _refund_orphan(self, call: asyncio.Future) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        if (r := call.result().reservation) is not None:
            self._later(self._settle(r, 0.0, None))

    async def _settle(self, r: Reservation, units: float,
                      spec: PlanSpec | None) -> float | None:
        """Commit `units` of the reservation (0: refund it); the price charged, None
        when nothing was (a refund, a reservation already settled, or a store that
        failed: then the answer still goes out, the request is not charged and its
        hold expires: logged and counted `unsettled`)."""
        with stage("commit" if units else "refund"):
            try:
                before = await asyncio.shield(self.ledger.commit(r, units))
            except StateUnavailable:
                log.warning("could not settle reservation %s of %s; its hold will expire",
                            r.id, r.principal)
                annotate(quota_unsettled=True)
                return None
        return price(spec, units, before) if units and before is not None and spec else None

    def _order(self, p: Plan, spec: PlanSpec | None) -> list[str]:
        """The revisions to try, in order: the pinned one, or the tier's candidates;
        for a commercial plan only those whose licence allows commercial use."""
        order = [p.entry.name] if p.pinned else self.routing.candidates(p.tier)
        if spec is None or not spec.commercial:
            return order
        usable = [m for m in order if commercially_usable(spec, self.lock.get(m))]
        if not usable:
            terms = ", ".join(f"{m} {self.lock.get(m).commercial_use}" for m in order)
            raise CommercialUseForbidden(
                f"a commercial plan may not use tier {p.tier!r}: its revisions' commercial "
                f"use is {terms}", details=[{"field": "tier", "type": "commercial_use"}])
        return usable

    async def _failover(self, p: Plan, order: list[str]) -> tuple[Generated, ModelEntry]:
        """Generate on the tier's first usable revision (ready, breaker closed or
        probing). A revision that fails is tried once more (Ray's router drops a
        dead replica, and the same revision and seed give the same image), unless
        it timed out (its call is cancelled; a second one would wait as long), then
        the next one. With nothing usable, the first candidate still gets the
        request (its error is the answer)."""
        err: Exception | None = None
        for model in order:
            for _ in range(2):
                if not self.routing.allow(model):
                    break
                try:
                    out = await self._attempt(model, p.jobs)
                except Overloaded:  # a ModelUnavailable, but never retried
                    raise
                except _RETRYABLE as e:
                    err = e
                    if isinstance(e, ModelTimeout):
                        break
                    continue
                return out, self.lock.get(model)
        if err is None:
            return await self.backend.generate(order[0], p.jobs), self.lock.get(order[0])
        raise err

    async def _attempt(self, model: str, jobs: list[Job]) -> Generated:
        """One call, its outcome told to the breaker; an exit with no outcome
        (overload, bad input, the caller gone) gives the breaker's probe slot back."""
        outcome = None
        try:
            out = await self.backend.generate(model, jobs)
            outcome = True
            return out
        except Overloaded:
            raise
        except _RETRYABLE:
            outcome = False
            raise
        finally:
            if outcome is None:
                self.routing.release(model)
            else:
                self.routing.record(model, ok=outcome)

def _logged(task: asyncio.Task) -> None:
    if not task.cancelled() and (e := task.exception()) is not None:
        log.warning("state store bookkeeping failed: %s", e)


def _genai_attributes(p: Plan) -> dict[str, object]:
    """GenAI semantic conventions where they fit, imagegen.* for the rest. The prompt
    is never recorded here."""
    j = p.jobs[0]
    return {
        "gen_ai.operation.name": "generate_content",
        "gen_ai.output.type": "image",
        "gen_ai.request.model": p.entry.name,
        "gen_ai.request.seed": j.seed,
        "imagegen.tier": p.tier,
        "imagegen.revision": p.entry.revision,
        "imagegen.images": len(p.jobs),
        "imagegen.seed_count": len({x.seed for x in p.jobs}),
        "imagegen.width": j.width,
        "imagegen.height": j.height,
        "imagegen.steps": j.steps,
        "imagegen.cache_hit": False,
    }

"""gRPC transport: imagegen.v1.Images (proto/imagegen/v1/images.proto) and
grpc.health.v1.Health/Check, thin over ImageService. No business rules here.

Ray Serve serves it on the ingress deployment: `add_servicers` tells Serve's gRPC
servers (the proxy, and each ingress replica under direct ingress) which methods
exist, and Serve calls the ingress method of the same name (Generate, GetImage,
Check, ...), which calls `GrpcTransport`. Errors come from the one table in
serve/errors.py: the status and message on the call, the stable code and what
else a caller acts on in the trailing metadata. A method never raises: an
exception would reach the caller as INTERNAL with Ray's traceback. A local store's
image URL is a path on the HTTP port ("/v1/files/..."): gRPC has no HTTP base URL
to make it absolute with, so it stays relative.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2

from ..batch.jobs import BatchCreate, BatchView, ItemView, batch_body_limit
from ..errors import (
    Draining,
    ImagegenError,
    MalformedBody,
    PayloadTooLarge,
    QuotaExceeded,
    row,
)
from ..quotas.idempotency import valid_key
from ..schemas import GenerateRequest, GenerateResponse, ImageSafety, validate
from ..service import ImageService
from ..storage.records import ImageRecord
from ..telemetry import Metrics, annotate, request_scope, stage
from .http import ratelimit_fields, valid_request_id
from .proto import images_pb2 as pb

log = logging.getLogger("imagegen.grpc")

SERVICE = pb.DESCRIPTOR.services_by_name["Images"].full_name  # imagegen.v1.Images
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVICER_FUNCTIONS = [f"{__name__}.add_servicers"]  # gRPCOptions.grpc_servicer_functions
# Trailing metadata keys (README § gRPC). Serve adds `request_id`.
CODE_KEY, DETAILS_KEY, TRACE_KEY, RETRY_KEY, ID_KEY = (
    "imagegen-code", "imagegen-details", "imagegen-trace-id", "retry-after",
    "imagegen-request-id")
IDEMPOTENCY_KEY = "idempotency-key"  # the invocation metadata twin of the HTTP header
# Trailers share gRPC's 8 KiB metadata limit: past it the caller sees a bare failure.
_MAX_MESSAGE, _MAX_DETAILS = 1024, 4096
_QUALITY = {pb.QUALITY_LOW: "low", pb.QUALITY_STANDARD: "standard", pb.QUALITY_HIGH: "high"}
_METHODS = {SERVICE: ("Generate", "ListModels", "GetQuota", "ListTemplates", "GetImage",
                      "Reroll", "SubmitBatch", "GetBatch", "ListBatches", "CancelBatch",
                      "GetBatchResults"),
            HEALTH: ("Check",)}

def add_servicers(servicer: Any, server: grpc.aio.Server) -> None:
    """Register the methods on a gRPC server (Serve calls this with a stand-in
    servicer and routes every method to the ingress itself; any grpc.aio server
    works with a real one). Requests arrive as bytes, parsed here, so a malformed
    message is INVALID_ARGUMENT, not grpc's INTERNAL. grpc.health.v1's streaming
    Watch is not offered: UNIMPLEMENTED."""
    for service, methods in _METHODS.items():
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {
            m: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, m), response_serializer=_serialize)
            for m in methods
        }),))


def _serialize(m: Message) -> bytes:
    return m.SerializeToString()


def _parse(message: type[Message], raw: bytes) -> Message:
    """A small request message from its bytes; MalformedBody if it is none."""
    try:
        return message.FromString(raw)
    except DecodeError as e:
        raise MalformedBody(f"request is not a valid {message.DESCRIPTOR.name}: {e}") from None


def to_request(raw: bytes) -> GenerateRequest:
    """An imagegen.v1.GenerateRequest as the one strict GenerateRequest; unset
    fields take the same defaults as on HTTP."""
    try:
        m = pb.GenerateRequest.FromString(raw)
    except DecodeError as e:
        raise MalformedBody(f"request is not a valid {pb.GenerateRequest.DESCRIPTOR.full_name}: "
                            f"{e}") from None
    return validate(GenerateRequest, request_fields(m, "request"))


def request_fields(m: pb.GenerateRequest, where: str) -> dict[str, Any]:
    """A GenerateRequest message as the JSON object POST /v1/images would carry:
    an unset field is absent, so it takes the same default as on HTTP. `where`
    names the message in the error for a field this server does not know."""
    _known(m, where)
    data: dict[str, Any] = {"variables": dict(m.variables)} if m.variables else {}
    for name in ("prompt", "negative_prompt", "tier", "size", "model", "template", "moderation",
                 "response_format", "output_format", "approval_id"):
        if value := getattr(m, name):
            data[name] = value
    for name in ("n", "seed", "steps", "guidance", "output_quality", "megapixels"):
        if m.HasField(name):
            data[name] = getattr(m, name)
    if m.aspect_ratios:
        data["aspect_ratios"] = list(m.aspect_ratios)
    if m.quality:
        data["quality"] = _QUALITY.get(m.quality, m.quality)  # unknown: refused by name
    return data


def to_batch(raw: bytes) -> BatchCreate:
    """An imagegen.v1.SubmitBatchRequest as POST /v1/batches' body: each request the
    object POST /v1/images takes (checked at submission, naming requests.N)."""
    m = _known(_parse(pb.SubmitBatchRequest, raw), "request")
    data: dict[str, Any] = {"requests": [request_fields(r, f"requests[{i}]")
                                         for i, r in enumerate(m.requests)]}
    for name in ("id", "completion_window_s", "webhook_url"):
        if m.HasField(name):
            data[name] = getattr(m, name)
    return validate(BatchCreate, data)


def _known(m: Message, where: str) -> Message:
    """`m`, or MalformedBody naming its fields this server does not know (a newer
    client's field would otherwise be silently dropped)."""
    unknown = sorted({f.field_number for f in UnknownFieldSet(m)})
    if unknown:
        raise MalformedBody(f"{where} has fields this server does not know: {unknown}")
    return m


def to_proto(r: GenerateResponse) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        id=r.id, trace_id=r.trace_id, created=r.created, tier=r.tier, model=r.model,
        revision=r.revision, fallback=r.fallback, pinned=r.pinned, batch_images=r.batch_images,
        cost_units=r.cost_units, price=r.price, replayed=r.replayed, template=r.template or "",
        template_successor=d.successor if (d := r.template_deprecation) else "",
        template_sunset=d.sunset.isoformat() if d else "", cached=r.cached,
        images=[pb.Image(id=i.id or "", seed=i.seed, width=i.width, height=i.height,
                         aspect_ratio=i.aspect_ratio or "", mime_type=i.mime_type,
                         data=base64.b64decode(i.b64_json) if i.b64_json else b"",
                         url=i.url or "",  # a path stays one: relative to the HTTP port
                         alt_text=i.alt_text.text if i.alt_text else "",
                         safety=_safety(i.safety))
                for i in r.images],
        timings=pb.Timings(**r.timings.model_dump()),
    )


def stored_proto(record: ImageRecord, url: str | None) -> pb.StoredImage:
    """GET /v1/images/{id}'s answer as imagegen.v1.StoredImage: times as the JSON
    writes them, the recipe as its JSON."""
    when = record.model_dump(mode="json", include={"created", "expires"})
    return pb.StoredImage(
        id=record.id, request_id=record.request_id, created=when["created"],
        expires=when["expires"] or "", mime_type=record.mime_type, width=record.width,
        height=record.height, aspect_ratio=record.aspect_ratio or "", seed=record.seed,
        tier=record.tier, model=record.model, revision=record.revision,
        template=record.template or "", approval_id=record.approval_id or "",
        safety=_safety(record.safety), alt_text=record.alt_text.text if record.alt_text else "",
        cost_units=record.cost_units, cached=record.cached, url=url or "",
        recipe_json=record.recipe.model_dump_json())


def batch_proto(b: BatchView) -> pb.Batch:
    """GET /v1/batches/{id}'s answer field for field; None (no webhook, no manifest
    yet) is the empty string."""
    return pb.Batch(**{k: "" if v is None else v for k, v in b.model_dump().items()})


def item_proto(i: ItemView) -> pb.BatchItem:
    """GET /v1/batches/{id}/results' item; its result as the worker records it
    (serve/service.py run_item)."""
    r = i.result
    return pb.BatchItem(
        index=i.index, state=i.state, attempts=i.attempts, error=i.error or "",
        result=None if r is None else pb.BatchItemResult(
            image_ids=[x or "" for x in r["images"]], seeds=r["seeds"],
            revision=r["revision"], model=r["model"], cost_units=r["cost_units"],
            cached=r["cached"], withheld=r["withheld"]))


def _safety(s: ImageSafety) -> pb.ImageSafety:
    return pb.ImageSafety(action=s.action, category=s.category or "",
                          review_id=s.review_id or "")


def template_proto(t) -> pb.Template:
    variables = {}
    for name, v in t.variables.items():
        spec = v.model_dump(exclude_none=True)
        default = spec.pop("default", None)
        variables[name] = pb.TemplateVariable(
            **spec, default="" if default is None else str(default))
    return pb.Template(
        id=t.id, version=t.version, status=t.status, kind=t.kind, description=t.description,
        owner=t.owner, tiers=t.tiers, variables=variables, free_text=t.free_text or "",
        deprecated_on=t.deprecated_on.isoformat() if t.deprecated_on else "",
        successor=t.successor or "", preview=t.preview or "")


class GrpcTransport:
    """The gRPC methods over one ingress replica's ImageService."""

    def __init__(self, service: ImageService,
                 readiness: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
                 metrics: Metrics, *, max_body_bytes: int = 64 << 10,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.service = service
        self.readiness = readiness
        self.metrics = metrics
        self.draining = draining  # the replica is stopping: refuse new calls (UNAVAILABLE)
        # As on HTTP. Serve's gRPC servers take messages up to 2 GiB, and parsing one
        # (and listing its unknown fields) would hold the event loop for seconds.
        self.max_body_bytes = max_body_bytes

    async def generate(self, raw: bytes, context) -> pb.GenerateResponse:
        async def call(raw: bytes, rid: str, principal, metadata) -> pb.GenerateResponse:
            with stage("validate"):
                req = to_request(raw)
                key = metadata.get(IDEMPOTENCY_KEY)
            return to_proto(await self.service.generate(
                req, rid, principal, None if key is None else valid_key(key)))

        return await self._call("Generate", call, raw, context, pb.GenerateResponse,
                                generation=True)

    async def list_models(self, raw: bytes, context) -> pb.ListModelsResponse:
        async def call(raw: bytes, _rid: str, _principal, _metadata) -> pb.ListModelsResponse:
            _parse(pb.ListModelsRequest, raw)
            return pb.ListModelsResponse(models=[
                pb.Model(**m.model_dump(exclude={"defaults", "limits"}),
                         defaults=pb.ModelDefaults(**m.defaults.model_dump()),
                         limits=pb.ModelLimits(**m.limits.model_dump()))
                for m in self.service.models()])

        return await self._call("ListModels", call, raw, context, pb.ListModelsResponse,
                                generation=False)

    async def get_quota(self, raw: bytes, context) -> pb.Quota:
        async def call(raw: bytes, _rid: str, principal, _metadata) -> pb.Quota:
            m = _parse(pb.GetQuotaRequest, raw)
            return pb.Quota(**(await self.service.quota(principal, m.principal or None)
                               ).model_dump())

        return await self._call("GetQuota", call, raw, context, pb.Quota, generation=False)

    async def list_templates(self, raw: bytes, context) -> pb.ListTemplatesResponse:
        async def call(raw: bytes, _rid: str, _principal, _metadata) -> pb.ListTemplatesResponse:
            _parse(pb.ListTemplatesRequest, raw)
            return pb.ListTemplatesResponse(
                templates=[template_proto(t) for t in self.service.templates()])

        return await self._call("ListTemplates", call, raw, context, pb.ListTemplatesResponse,
                                generation=False)

    async def get_image(self, raw: bytes, context) -> pb.StoredImage:
        async def call(raw: bytes, _rid: str, principal, _metadata) -> pb.StoredImage:
            m = _parse(pb.ImageRef, raw)
            return stored_proto(*await self.service.image(principal, m.id))

        return await self._call("GetImage", call, raw, context, pb.StoredImage,
                                generation=False)

    async def reroll(self, raw: bytes, context) -> pb.GenerateResponse:
        async def call(raw: bytes, rid: str, principal, _metadata) -> pb.GenerateResponse:
            with stage("validate"):
                m = _parse(pb.RerollRequest, raw)
            return to_proto(await self.service.reroll(
                principal, m.id, rid, m.seed if m.HasField("seed") else None))

        # a generation, counted as Generate is (HTTP's reroll route is too)
        return await self._call("Reroll", call, raw, context, pb.GenerateResponse,
                                generation=True)

    # Batch jobs (README § Batch jobs): queued here, run by the replicas' workers, so
    # none counts as a generation (each item is counted as it runs).

    async def submit_batch(self, raw: bytes, context) -> pb.Batch:
        async def call(raw: bytes, _rid: str, principal, _metadata) -> pb.Batch:
            with stage("validate"):
                body = to_batch(raw)
            return batch_proto(await self.service.submit_batch(principal, body))

        return await self._call("SubmitBatch", call, raw, context, pb.Batch, generation=False,
                                max_bytes=batch_body_limit(self.max_body_bytes))

    async def get_batch(self, raw: bytes, context) -> pb.Batch:
        return await self._on_batch("GetBatch", raw, context, self.service.batch,
                                    batch_proto, pb.Batch)

    async def list_batches(self, raw: bytes, context) -> pb.ListBatchesResponse:
        async def call(raw: bytes, _rid: str, principal, _metadata) -> pb.ListBatchesResponse:
            _parse(pb.ListBatchesRequest, raw)
            return pb.ListBatchesResponse(
                batches=[batch_proto(b) for b in await self.service.my_batches(principal)])

        return await self._call("ListBatches", call, raw, context, pb.ListBatchesResponse,
                                generation=False)

    async def cancel_batch(self, raw: bytes, context) -> pb.Batch:
        return await self._on_batch("CancelBatch", raw, context, self.service.cancel_batch,
                                    batch_proto, pb.Batch)

    async def get_batch_results(self, raw: bytes, context) -> pb.BatchResults:
        return await self._on_batch(
            "GetBatchResults", raw, context, self.service.batch_results,
            lambda items: pb.BatchResults(items=[item_proto(i) for i in items]),
            pb.BatchResults)

    async def _on_batch(self, method: str, raw: bytes, context, answer, to_proto, response):
        """An RPC on one batch (a BatchRef): the service's `answer(caller, id)`, as
        `to_proto` shapes it."""
        async def call(raw: bytes, _rid: str, principal, _metadata):
            return to_proto(await answer(principal, _parse(pb.BatchRef, raw).id))

        return await self._call(method, call, raw, context, response, generation=False)

    async def check(self, raw: bytes, context) -> health_pb2.HealthCheckResponse:
        """SERVING exactly when /readyz answers 200 (every enabled tier has a ready
        revision, and the replica is not stopping), for the server ("") and for
        imagegen.v1.Images. Not logged, like the HTTP probes."""
        status = health_pb2.HealthCheckResponse
        try:
            if len(raw) > self.max_body_bytes:
                raise DecodeError("too large")
            service = health_pb2.HealthCheckRequest.FromString(raw).service
        except DecodeError:
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details("request is not a valid HealthCheckRequest")
            return status()
        if service not in ("", SERVICE):
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {service!r}")
            return status()
        try:
            ready, _ = await self.readiness()
        except Exception:  # cannot tell: not serving (never a traceback)
            log.exception("readiness failed in %s/Check", HEALTH)
            ready = False
        return status(status=status.SERVING if ready else status.NOT_SERVING)

    async def _call(self, method: str, call: Callable[..., Awaitable[Message]],
                    raw: bytes, context, empty: type[Message], *, generation: bool,
                    max_bytes: int | None = None) -> Message:
        """One request's telemetry scope (as the HTTP middleware opens it) around
        `call`; an error becomes the status, details and trailing metadata. A message
        over `max_bytes` (default: max_body_bytes) is refused unparsed."""
        max_bytes = max_bytes or self.max_body_bytes
        metadata = _metadata(context)
        rid = _request_id(context)
        path = f"/{SERVICE}/{method}"
        with request_scope(
            f"{SERVICE}/{method}", request_id=rid, route=path, carrier=metadata,
            metrics=self.metrics, generation=generation, transport="grpc",
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
        ) as rec:
            trailers = [(TRACE_KEY, rec.trace_id), (ID_KEY, rid)]
            try:
                if self.draining():
                    raise Draining("this replica is stopping; retry (another one will answer)")
                if len(raw) > max_bytes:
                    raise PayloadTooLarge(f"message of {len(raw)} bytes exceeds {max_bytes}")
                principal = await self.service.authenticate(metadata, _peer(context))
                out = await call(raw, rid, principal, metadata)
                rec.status, rec.grpc_status = 200, "OK"
            except asyncio.CancelledError:
                rec.grpc_status = "CANCELLED"  # the caller left (deadline, cancel)
                raise
            except Exception as e:
                if not isinstance(e, ImagegenError):
                    log.exception("unhandled error in %s", path)
                    e = ImagegenError("internal error; see server logs")
                out = empty()
                r = row(e)
                annotate(code=e.code)
                rec.status, rec.grpc_status = r.http, r.grpc
                context.set_code(grpc.StatusCode[r.grpc])
                context.set_details(_truncate(e.message, _MAX_MESSAGE))
                trailers.append((CODE_KEY, e.code))
                if e.retry_after_s is not None:
                    trailers.append((RETRY_KEY, str(e.retry_after_s)))
                if isinstance(e, QuotaExceeded) and e.ratelimit:  # as the HTTP fields say
                    trailers += [(k.lower(), v) for k, v in ratelimit_fields(e.ratelimit).items()]
                if e.details is not None:
                    details = json.dumps(e.details, separators=(",", ":"))  # ASCII
                    if len(details) <= _MAX_DETAILS:
                        trailers.append((DETAILS_KEY, details))
            context.set_trailing_metadata(trailers)
            return out


def _metadata(context) -> dict[str, str]:
    """The invocation metadata by key; a repeated key's values joined with ", " as
    HTTP joins a repeated header (so a repeated credential never reads as one)."""
    out: dict[str, str] = {}
    for k, v in context.invocation_metadata():
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def _peer(context) -> str | None:
    """The caller's IP address from gRPC's peer string (`ipv4:1.2.3.4:5`,
    `ipv6:[::1]:5`); None for another kind (a Unix socket)."""
    kind, _, rest = unquote(context.peer()).partition(":")  # grpcio: ipv6:%5B::1%5D:5
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return None


def _truncate(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 15] + "... [truncated]"


def _request_id(context) -> str:
    """Serve's request id (the caller's `request_id` metadata, else one Serve made),
    which Serve also sends back in the trailing metadata."""
    return valid_request_id(dict(context.trailing_metadata()).get("request_id", ""))

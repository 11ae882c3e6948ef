"""HTTP transport: thin routes over ImageService. No business rules here."""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from email.utils import format_datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..batch.jobs import (
    JSONL_TYPES,
    BatchCreate,
    BatchView,
    ItemView,
    batch_body_limit,
)
from ..errors import (
    Draining,
    ImagegenError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    Unauthenticated,
    UnsupportedMediaType,
    http_status,
)
from ..imaging import MIME
from ..quotas.idempotency import valid_key
from ..safety.review import AppealReceipt, ReviewItem
from ..schemas import (
    AppealRequest,
    ErrorEnvelope,
    GenerateRequest,
    GenerateResponse,
    ModelList,
    QuotaStatus,
    ReviewDecisionRequest,
    TemplateList,
    load_json,
    parse_request,
    validate,
)
from ..service import ImageService
from ..storage.records import RerollRequest, StoredImage
from ..storage.results import FILES_ROUTE
from ..telemetry import Metrics, annotate, current_trace_id, request_scope, stage
from ..templates.library import Template

log = logging.getLogger("imagegen.http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_ROUTES = frozenset({"/v1/images", "/v1/images/generations", "/v1/models", "/v1/quota",
                     "/v1/templates", "/v1/review", "/v1/appeals", "/v1/routing",
                     "/healthz", "/readyz"})  # span names
_PROBES = frozenset({"/healthz", "/readyz"})  # still answered while draining
_GENERATION = frozenset({("POST", "/v1/images"), ("POST", "/v1/images/generations")})
_REROLL = re.compile(r"/v1/images/[^/]+/reroll")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503)
}


def request_id(request: Request) -> str:
    """The caller's X-Request-Id when well-formed, else a fresh one."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = valid_request_id(request.headers.get("x-request-id", ""))
        request.state.request_id = rid
    return rid


def deprecation_headers(resp: GenerateResponse) -> dict[str, str]:
    """A deprecated template version: when it goes (Sunset, RFC 8594) and what
    replaces it (a successor-version link, RFC 5829)."""
    d = resp.template_deprecation
    if d is None:
        return {}
    sunset = dt.datetime.combine(d.sunset, dt.time(), dt.UTC)
    return {"Sunset": format_datetime(sunset, usegmt=True),
            "Link": f'</v1/templates/{d.successor}>; rel="successor-version"'}


def peer(request: Request) -> str | None:
    """The address the request came from (a gateway's, behind one)."""
    return request.client.host if request.client else None


def idempotency_key(request: Request) -> str | None:
    """The `Idempotency-Key` header (draft-ietf-httpapi-idempotency-key-header), checked."""
    key = request.headers.get("idempotency-key")
    return None if key is None else valid_key(key)


def valid_request_id(given: str) -> str:
    """`given` when it is a well-formed request id, else a fresh one."""
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def error_headers(request: Request, err: ImagegenError,
                  headers: dict[str, str] | None = None) -> dict[str, str]:
    """The headers of an error answer, whatever its envelope; records its code."""
    annotate(code=err.code)
    headers = {**(headers or {}), **id_header(request)}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    if isinstance(err, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="imagegen"'
    if isinstance(err, QuotaExceeded) and err.ratelimit:
        headers.update(ratelimit_fields(err.ratelimit))
    return headers


def ratelimit_fields(rl: dict[str, Any]) -> dict[str, str]:
    """The RateLimit-Policy and RateLimit fields of draft-ietf-httpapi-ratelimit-headers-10
    for a refused budget. Quotas and remainders are integers there, cost units are
    fractional: they are sent in thousandths, said by the `imagegen-unit` parameter."""
    name = f'"{rl["policy"]}"'
    remaining = math.floor(max(0.0, rl["remaining"]) * 1000 + 1e-6)
    return {
        "RateLimit-Policy": f'{name};q={round(rl["limit"] * 1000)};'
                            f'w={max(1, math.ceil(rl["window"] - 1e-6))};'
                            f'imagegen-unit="milli-cost-units"',
        "RateLimit": f'{name};r={remaining};t={max(1, math.ceil(rl["reset"] - 1e-6))}',
    }


def error_response(
    request: Request, err: ImagegenError, headers: dict[str, str] | None = None
) -> JSONResponse:
    headers = error_headers(request, err, headers)
    body = err.envelope()
    if trace_id := current_trace_id():
        body["error"]["trace_id"] = trace_id
    return JSONResponse(body, status_code=http_status(err), headers=headers)


def base_url(request: Request, url: str | None) -> str | None:
    """A local store's link is a path on this service: made absolute for the caller."""
    if url is None or not url.startswith("/"):
        return url
    return str(request.base_url).rstrip("/") + url


def absolute(request: Request, resp: GenerateResponse) -> GenerateResponse:
    if not any(i.url and i.url.startswith("/") for i in resp.images):
        return resp
    return resp.model_copy(update={"images": [
        i.model_copy(update={"url": base_url(request, i.url)}) for i in resp.images]})


def id_header(request: Request) -> dict[str, str]:
    if request.app.state.echo_request_id:
        return {"X-Request-Id": request_id(request)}
    return {}


def build_http_app(
    service: ImageService,
    readiness: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
    *,
    max_body_bytes: int,
    metrics: Metrics,
    echo_request_id: bool = True,
    draining: Callable[[], bool] | None = None,
) -> FastAPI:
    """The HTTP app. Behind Ray Serve pass echo_request_id=False: the Serve proxy
    already answers with the X-Request-ID it passed in (a second one would repeat it).
    While `draining()` (the replica is stopping) new requests are refused (see DrainGate)."""
    # FastAPI's own OpenTelemetry spans are off: the Telemetry middleware opens the
    # server span the same way for every transport (gRPC: ingress/grpc.py).
    # FastAPIOffline serves /docs with Swagger UI from its package, not a public CDN:
    # it renders on a cluster with no internet and tells no third party of a visit.
    app = FastAPIOffline(
        title="imagegen", version="1", docs_url="/docs", redoc_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.echo_request_id = echo_request_id
    batch_body_bytes = batch_body_limit(max_body_bytes)
    if draining is not None:  # inside Telemetry: a refusal is logged, counted, traced
        # `answer` (below) is looked up per request: each route's own envelope.
        app.add_middleware(DrainGate, draining=draining, refuse=lambda r, e: answer(r, e))
    app.add_middleware(Telemetry, metrics=metrics, echo_request_id=echo_request_id)

    @app.post(
        "/v1/images",
        response_model=GenerateResponse,
        responses=_ERRORS,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": GenerateRequest.model_json_schema()}}}},
    )
    async def generate(request: Request) -> Response:
        principal = await service.authenticate(request.headers, peer(request))
        body = await read_json_body(request, max_body_bytes)
        with stage("validate"):
            req = parse_request(body)
        resp = await service.generate(req, request_id(request), principal,
                                      idempotency_key(request))
        return Response(absolute(request, resp).model_dump_json(), media_type="application/json",
                        headers=id_header(request) | deprecation_headers(resp))

    @app.post("/v1/batches", response_model=BatchView, responses=_ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": BatchCreate.model_json_schema()},
                  "application/jsonl": {"schema": {"type": "string", "description":
                      "one request per line; id, completion_window_s and webhook_url "
                      "as query parameters"}}}}})
    async def submit_batch(request: Request) -> BatchView:
        """Up to `batch_max_items` generation requests, checked now, run in the
        background (README § Batch jobs): a JSON body, or a JSONL file."""
        caller = await service.authenticate(request.headers, peer(request))
        if content_type(request) in JSONL_TYPES:
            return await service.submit_batch_jsonl(
                caller, await read_body(request, batch_body_bytes),
                dict(request.query_params))
        body = validate(BatchCreate, load_json(await read_json_body(request, batch_body_bytes)))
        return await service.submit_batch(caller, body)

    @app.get("/v1/batches", response_model=list[BatchView], responses=_ERRORS)
    async def my_batches(request: Request) -> list[BatchView]:
        return await service.my_batches(await service.authenticate(request.headers,
                                                                   peer(request)))

    @app.get("/v1/batches/{batch_id}", response_model=BatchView, responses=_ERRORS)
    async def batch(batch_id: str, request: Request) -> BatchView:
        caller = await service.authenticate(request.headers, peer(request))
        return await service.batch(caller, batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", response_model=BatchView, responses=_ERRORS)
    async def cancel_batch(batch_id: str, request: Request) -> BatchView:
        caller = await service.authenticate(request.headers, peer(request))
        return await service.cancel_batch(caller, batch_id)

    @app.get("/v1/batches/{batch_id}/results", response_model=list[ItemView],
             responses=_ERRORS)
    async def batch_results(batch_id: str, request: Request) -> list[ItemView]:
        """Each item's state, attempts, result (image ids, revision, cost) or error."""
        caller = await service.authenticate(request.headers, peer(request))
        return await service.batch_results(caller, batch_id)

    @app.get("/v1/images/{image_id}", response_model=StoredImage, responses=_ERRORS)
    async def image(image_id: str, request: Request) -> StoredImage:
        """A stored image's sidecar (its owner or an admin; anyone else: 404)."""
        caller = await service.authenticate(request.headers, peer(request))
        record, url = await service.image(caller, image_id)
        return StoredImage(**record.public(), url=base_url(request, url))

    @app.post("/v1/images/{image_id}/reroll", response_model=GenerateResponse,
              responses=_ERRORS, openapi_extra={"requestBody": {"required": False, "content": {
                  "application/json": {"schema": RerollRequest.model_json_schema()}}}})
    async def reroll(image_id: str, request: Request) -> Response:
        """The image's request again with a new seed (or the one given)."""
        caller = await service.authenticate(request.headers, peer(request))
        empty = request.headers.get("content-length") in (None, "0") and \
            "chunked" not in request.headers.get("transfer-encoding", "")
        body = b"{}" if empty else await read_json_body(request, 4096)
        r = validate(RerollRequest, load_json(body))
        resp = await service.reroll(caller, image_id, request_id(request), r.seed)
        return Response(absolute(request, resp).model_dump_json(), media_type="application/json",
                        headers=id_header(request) | deprecation_headers(resp))

    @app.get(FILES_ROUTE + "{path:path}", response_class=Response, responses={
        **_ERRORS, 200: {"content": {m: {} for m in MIME.values()}}})
    async def file(path: str, request: Request, expires: int = 0, sig: str = "") -> Response:
        """A stored image by its signed link (the local store; S3 links are presigned).
        Its bytes never change: cached as immutable."""
        data, mime = await service.file(path, expires, sig)
        # the caller's own image, for as long as its link works: no shared cache
        headers = {"ETag": f'"{path.rsplit("/", 1)[-1].split(".")[0][:40]}"',
                   "Cache-Control": f"private, max-age={max(0, expires - int(time.time()))}"}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=mime, headers=headers)

    from . import openai  # it imports this module's helpers

    openai.add_routes(app, service, max_body_bytes=max_body_bytes)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models(request: Request) -> ModelList:
        await service.authenticate(request.headers, peer(request))
        return ModelList(models=service.models())

    @app.get("/v1/quota", response_model=QuotaStatus, responses=_ERRORS)
    async def my_quota(request: Request) -> QuotaStatus:
        """The caller's budget now."""
        return await service.quota(await service.authenticate(request.headers, peer(request)))

    @app.get("/v1/quota/{principal}", response_model=QuotaStatus, responses=_ERRORS)
    async def quota(principal: str, request: Request) -> QuotaStatus:
        """Any principal's budget (the admin role; anyone for their own)."""
        caller = await service.authenticate(request.headers, peer(request))
        return await service.quota(caller, principal)

    @app.get("/v1/templates", response_model=TemplateList, responses=_ERRORS)
    async def templates(request: Request) -> TemplateList:
        """Every template version in the style library, with its variables and state."""
        await service.authenticate(request.headers, peer(request))
        return TemplateList(templates=service.templates())

    @app.get("/v1/templates/{template}", response_model=Template, responses=_ERRORS)
    async def template(template: str, request: Request) -> Template:
        """One version: `id` (the newest that serves) or `id@version`."""
        caller = await service.authenticate(request.headers, peer(request))
        return service.template(template, caller)

    @app.get("/v1/review", response_model=list[ReviewItem], responses=_ERRORS)
    async def review_list(request: Request, status: Literal["open", "approved", "rejected",
                                                            "all"] = "open",
                          restricted: bool = False) -> list[ReviewItem]:
        """Blocked requests to review (role reviewer; restricted cases: admin)."""
        caller = await service.authenticate(request.headers, peer(request))
        return await service.review_list(caller, None if status == "all" else status,
                                         restricted)

    @app.get("/v1/review/{item_id}", response_model=ReviewItem, responses=_ERRORS)
    async def review_item(item_id: str, request: Request) -> ReviewItem:
        caller = await service.authenticate(request.headers, peer(request))
        return await service.review_item(caller, item_id)

    @app.get("/v1/review/{item_id}/images/{index}", response_class=Response,
             responses={200: {"description": "the flagged image, unblurred", "content": {
                 "image/png": {"schema": {"type": "string", "format": "binary"}}}}, **_ERRORS})
    async def review_image(item_id: str, index: Annotated[int, Path(ge=0, le=255)],
                           request: Request) -> Response:
        """An image case's flagged image `index` as a PNG, unblurred (role reviewer; a
        restricted case: admin)."""
        caller = await service.authenticate(request.headers, peer(request))
        png = await service.review_evidence(caller, item_id, index)
        # no-store: evidence (a restricted case's included) stays out of every cache
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/v1/review/{item_id}/decision", response_model=ReviewItem, responses=_ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ReviewDecisionRequest.model_json_schema()}}}})
    async def review_decide(item_id: str, request: Request) -> ReviewItem:
        caller = await service.authenticate(request.headers, peer(request))
        d = validate(ReviewDecisionRequest, load_json(await read_json_body(request, 4096)))
        return await service.review_decide(caller, item_id, d.decision, d.reason)

    @app.post("/v1/appeals", response_model=AppealReceipt, responses=_ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": AppealRequest.model_json_schema()}}}})
    async def appeal(request: Request) -> AppealReceipt:
        """A blocked caller's appeal: it joins the blocked request's case (the answer
        says so; the case stays the reviewers')."""
        caller = await service.authenticate(request.headers, peer(request))
        a = validate(AppealRequest, load_json(await read_json_body(request, 8192)))
        return AppealReceipt.of(await service.appeal(caller, a.request_id, a.message))

    @app.get("/v1/routing")
    async def routing() -> dict[str, Any]:
        """The routing document this ingress applies, where it came from, and each
        tier's and revision's state (readiness, breaker)."""
        return service.routing.snapshot()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready, detail = await readiness()
        return JSONResponse({"ready": ready, **detail}, status_code=200 if ready else 503)

    def answer(request: Request, err: ImagegenError, headers=None) -> JSONResponse:
        # Each route answers in its own envelope: OpenAI's on its route.
        if request.url.path == openai.ROUTE:
            return openai.error(request, err, headers)
        return error_response(request, err, headers)

    @app.exception_handler(ImagegenError)
    async def _imagegen_error(request: Request, err: ImagegenError) -> JSONResponse:
        return answer(request, err)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a query or path parameter FastAPI checked (bodies are parsed by hand)
        fields = [{"field": ".".join(map(str, e["loc"])), "type": e["type"],
                   "message": e["msg"]} for e in exc.errors()]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return answer(request, InvalidRequest(f"invalid request: {summary}", details=fields))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return answer(
                request, MethodNotAllowed(f"{request.method} not allowed here"), exc.headers
            )
        return answer(request, NotFound(f"no route {request.url.path}"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return answer(request, ImagegenError("internal error; see server logs"))

    return app


async def read_json_body(request: Request, limit: int) -> bytes:
    """The body of an application/json request, at most `limit` bytes."""
    ctype = content_type(request)
    if ctype != "application/json":
        raise UnsupportedMediaType(f"content-type must be application/json, got {ctype!r}")
    return await read_body(request, limit)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class DrainGate:
    """ASGI middleware for a replica that is stopping: a new request is refused 503
    `draining` with Retry-After (in its route's envelope), the probes still answer
    (/readyz 503), and every answer closes its connection, so a client's next request
    opens a new one, which the load balancer gives a replica that is not stopping,
    instead of racing the server's close on a kept-alive one."""

    def __init__(self, app, draining: Callable[[], bool],
                 refuse: Callable[[Request, ImagegenError], Response]) -> None:
        self.app = app
        self.draining = draining
        self.refuse = refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_closing(message) -> None:
            if message["type"] == "http.response.start" and self.draining():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        if self.draining() and scope["path"] not in _PROBES:
            request = Request(scope, receive)
            refusal = Draining("this replica is stopping; retry (another one will answer)")
            return await self.refuse(request, refusal)(scope, receive, send_closing)
        await self.app(scope, receive, send_closing)


class Telemetry:
    """ASGI middleware: a SERVER span for every request (child of an inbound
    traceparent), X-Trace-Id on every response, and for the API routes one log
    line and one metrics update (health probes stay quiet)."""

    def __init__(self, app, metrics: Metrics, echo_request_id: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.echo_request_id = echo_request_id

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        rid = valid_request_id(headers.get("x-request-id", ""))
        scope.setdefault("state", {})["request_id"] = rid
        path, method = scope["path"], scope["method"]
        with request_scope(
            f"{method} {path}" if path in _ROUTES else method, request_id=rid, route=path,
            carrier=headers, metrics=self.metrics, log=path.startswith("/v1/"),
            generation=(method, path) in _GENERATION or _REROLL.fullmatch(path) is not None
            and method == "POST",
            transport="openai" if path == "/v1/images/generations" else "http",
        ) as rec:

            async def send_with_trace(message) -> None:
                if message["type"] == "http.response.start":
                    rec.status = message["status"]
                    message["headers"] = [
                        *message.get("headers", []), (b"x-trace-id", rec.trace_id.encode())
                    ]
                await send(message)

            try:
                await self.app(scope, receive, send_with_trace)
            except Exception:
                # Inside the span, so the 500 carries the trace id like any error
                # (Starlette's last-resort handler sits outside this middleware).
                log.exception("unhandled error on %s %s", method, path)
                if rec.status:
                    raise  # the response has started: nothing more can be said
                err = ImagegenError("internal error; see server logs")
                annotate(code=err.code)
                body = err.envelope()
                body["error"]["trace_id"] = rec.trace_id
                headers = {"X-Request-Id": rid} if self.echo_request_id else None
                await JSONResponse(body, status_code=500, headers=headers)(
                    scope, receive, send_with_trace)

"""The HTTP edge of the DreamBlend service: routes, API key, limits, error bodies, OpenAPI, docs.

``make_api(args, backend, read_manifest, list_subjects, read_collapse_plot)`` builds the FastAPI app that the Ray ingress serves
(``serve_app.DreamBlendIngress``); it runs in-process over any ``serving.Backend``, which is how
the tests and the Schemathesis run exercise it without Ray.

Every answer is one of the statuses in ``ERRORS`` (declared per route in the OpenAPI schema, with
its body model), and no answer carries a storage path, a base model's source path or library
versions: storage faults are logged server-side and the client gets one sentence naming the
subject. The validation handler never echoes the request's values, so no input (NaN, Infinity,
lone surrogates, 16 KB of text) can make the error answer itself fail.

The docs (``/docs``, ``/redoc``) load Swagger UI and ReDoc from the ``fastapi-offline`` package,
served by this app under ``/static-offline-docs``, and carry a Content-Security-Policy that confines
them to this server (ReDoc's sidebar would otherwise fetch a logo from its CDN): they render on a
network without internet.
"""

import asyncio
import base64
import collections
import logging
import math
import threading
import time
from functools import partial
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, Field

from dreamblend_ray.config import DEFAULT_TENANT, SUBJECT_ID_PATTERN
from dreamblend_ray.io.storage import StorageError
from dreamblend_ray.training.layout import base_name, tenant_root
from dreamblend_ray.serving import requests as serving
from dreamblend_ray.lifecycle.scheduler import IdempotencyMismatch, QuotaExceeded, SubjectExists
from dreamblend_ray.serving import access, subjects_api, tenants
from dreamblend_ray.serving.quotas import QuotaLimiter
from dreamblend_ray.lifecycle.audit import AuditLog
from dreamblend_ray.serving.batching import GenerationJob, GenerationResult
from dreamblend_ray.serving.subjects_api import Progress, tenant_of
from dreamblend_ray.serving.requests import (AppArgs, DeadlineExceeded, FieldError, GenerateRequest, Overloaded,
                                             ReplicaUnavailable, SubjectConflict, SubjectNotFound, SubjectUnusable)

logger = logging.getLogger(__name__)

DOCS_STATIC = "/static-offline-docs"  # where fastapi-offline mounts its Swagger UI / ReDoc assets
DOCS_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc")
OPEN_PATHS = ("/healthz", "/openapi.json", *DOCS_PAGES)
# The docs pages may load nothing from outside this server: ReDoc's sidebar, for one, shows a logo
# from its CDN. The browser enforces the policy (inline script and styles are the pages' own).
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
            "base-uri 'self'; form-action 'self'; frame-ancestors 'self'")
# The playground page is "/", its assets are under PLAYGROUND; it may load and call nothing outside this
# server (its images arrive as data: and blob: URLs). Open like the docs: the page asks for the key.
PLAYGROUND = "/playground"
PLAYGROUND_FILES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
                    "playground.css": "text/css; charset=utf-8"}
PLAYGROUND_CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'self'; "
                  "form-action 'self'; frame-ancestors 'none'")
HEALTH_TIMEOUT_S = 10.0
MAX_SUBJECTS_PAGE = 200  # GET /v1/subjects?limit=
REPLICA_RETRY_AFTER_S = 10  # a replacement model replica is noticed in ~1 s, then loads its model
SECURITY = [{"bearer": []}, {"apiKey": []}]

# status -> (when, body model name); the single source of docs/serving.md's error table
ERRORS: dict[int, str] = {
    400: "the body cannot be read as JSON text (it is not UTF-8)",
    401: "auth is on and the API key is missing or wrong (also `/healthz?deep=true`)",
    404: "no such subject or job (never created, or deleted)",
    409: "the request conflicts with the subject's saved state: a guidance_step/edit_step that was not saved, "
         "a subject fine-tuned from another base model than the one this service loaded, a subject that is not "
         "ready (its status is named), or a create naming a subject id that exists",
    413: "the request body is larger than `max_body_bytes` (uploads: a file or the whole upload is over its limit; "
         "the body names the file and the rule)",
    415: "POST /v1/subjects: the body is neither multipart/form-data nor application/json",
    422: "a field is invalid or over a configured limit; `detail[].loc` names it",
    424: "the subject's saved manifest or checkpoints are damaged (the detail is logged, not answered); "
         "fine-tune it again",
    429: "a tenant's quota (the body's `quota` names it) or too many 401s from one address: retry after "
         "`Retry-After` seconds",
    500: "a fault in the service (logged there); the body says nothing more",
    503: "overloaded, storage unreachable or the model unavailable: retry after `Retry-After` seconds",
    504: "generation did not finish within `request_timeout_s`",
}


# --------------------------------------------------------------------------------------------
# Response bodies (documented in the OpenAPI schema)


class ErrorBody(BaseModel):
    """Every error but 422: one sentence for the client."""

    detail: str = Field(examples=["subject 'dog' not found"])


class ValidationIssue(BaseModel):
    loc: list[str | int] = Field(description="where: 'body' or 'path', then the field (and list index)",
                                 examples=[["body", "num_images"]])
    msg: str = Field(examples=["Input should be less than or equal to 4"])
    type: str = Field(examples=["less_than_equal"])


class ValidationErrorBody(BaseModel):
    """422: one entry per problem; the offending values are never echoed back."""

    detail: list[ValidationIssue]


class AttentionMaps(BaseModel):
    """Per-word heat maps of one image, each ``W x h x w`` (words, then the map grid)."""

    guidance: list[list[list[float]]] = Field(description="G's attention")
    edit: list[list[list[float]]] = Field(description="unguided E's attention")
    dreamblend: list[list[list[float]]] = Field(description="DreamBlend's (guided E's) attention")


class AttentionImages(BaseModel):
    """The two other trajectories' images (DreamBlend's is the main ``images[k]``), base64 PNGs."""

    guidance: str = Field(description="G's image")
    edit: str = Field(description="unguided E's image")


class AttentionView(BaseModel):
    """One image's cross-attention heat maps (``attention_maps``): one map per prompt word (its
    tokens summed), averaged over the selected layers and the steps maps_start..maps_stop."""

    words: list[str] = Field(description="the prompt's words, in order: the maps' first axis")
    rows: list[Literal["guidance", "edit", "dreamblend"]] = Field(description="the keys of maps, in display order")
    map_size: list[int] = Field(min_length=2, max_length=2, description="[h, w] of every map")
    maps: AttentionMaps
    images: AttentionImages
    attention_distance_steps: list[float | None] = Field(
        description="E-to-G attention distance per measured step (the guidance window)")


class SubjectList(BaseModel):
    """``GET /v1/subjects``: one page of complete subjects' ids, sorted."""

    subjects: list[str] = Field(examples=[["cat", "dog"]])
    next: str | None = Field(description="pass as `after` for the next page; null on the last page",
                             examples=["dog"])


class ImagesBody(BaseModel):
    """``POST /v1/generate`` as JSON: one base64 PNG per (prompt, image)."""

    subject_id: str
    model_id: str = Field(description="subject[@g<step>,e<step>]: the checkpoint pair that was used")
    prompts: list[str]
    seeds: list[int]
    images: list[str] = Field(description="base64-encoded PNGs, in the order of prompts and seeds")
    attention_distance: list[float | None] = Field(
        description="per image: mean attention distance between E and G over the guided steps")
    batch_size: int = Field(description="requests that shared the sampler call")
    replica: str
    attention: list[AttentionView] | None = Field(
        None, description="with attention_maps: per image (same order as images), its heat maps")


class BaseView(BaseModel):
    name: str = Field(description="the base model's name (the last part of its source, no path)",
                      examples=["tiny"])
    config_id: str = Field(description="first 12 hex digits of the base's config hash", examples=["3f2a9c01d4e5"])


class SubjectView(BaseModel):
    """What a client may know about a subject (not the storage layout or the training machine):
    its lifecycle (``status``, ``progress``, ``queue_position``, timestamps, ``error``) and, once
    ready, its checkpoints."""

    subject_id: str
    status: Literal["queued", "training", "ready", "failed", "canceled"] = "ready"
    class_noun: str | None = None
    token: str | None = None
    instance_prompt: str | None = Field(None, description="ready only")
    kind: Literal["lora", "full"] | None = Field(None, description="ready only")
    steps: list[int] | None = Field(None, description="ready only: saved checkpoint steps, the values "
                                                      "guidance_step/edit_step accept")
    guidance_step: int | None = Field(None, description="ready only: default G checkpoint")
    edit_step: int | None = Field(None, description="ready only: default E checkpoint")
    base: BaseView | None = Field(None, description="ready only")
    progress: Progress | None = Field(None, description="service trainings: optimizer steps and checkpoints")
    queue_position: int | None = Field(None, description="queued only: 1 = next to train")
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = Field(None, description="failed only: why")

    @classmethod
    def of(cls, manifest: dict) -> "SubjectView":
        base = manifest.get("base") or {}
        return cls(subject_id=manifest["subject_id"], class_noun=manifest["class_noun"], token=manifest["token"],
                   instance_prompt=manifest["instance_prompt"], kind=manifest["kind"], steps=manifest["steps"],
                   guidance_step=manifest["guidance_step"], edit_step=manifest["edit_step"],
                   base=BaseView(name=base_name(base.get("source", "")),
                                 config_id=str(base.get("config_sha256", ""))[:12]),
                   created_at=manifest.get("created_at"))


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: dict[str, Any] | None = Field(
        None, description="deep only: one model replica's id, loaded subjects, batches, device, peak RSS")


class RecentLatency(BaseModel):
    count: int = Field(description="generation requests answered in the window")
    window_s: float = Field(description="seconds the window spans (the last 256 requests at most)")
    p50_ms: float | None = None
    p95_ms: float | None = None
    errors: int = Field(0, description="of them, answered with a 4xx or 5xx")


class StatusView(BaseModel):
    """What the playground's status panel shows: one model replica's batch and this ingress's latencies."""

    replica: str | None = None
    family: str | None = None
    batching: str | None = None
    queue_depth: int | None = Field(None, description="jobs waiting to start sampling on the replica")
    active_rows: int | None = Field(None, description="images being denoised right now")
    rows_per_step: float | None = Field(None, description="mean images per UNet call over the recent steps")
    max_rows_per_step: int | None = None
    recent_steps: int | None = None
    step_ms: float | None = Field(None, description="mean time of a recent denoising step")
    guided_share: float | None = Field(None, description="the guidance part of recent denoising time (0..1)")
    last_step_at: float | None = Field(None, description="Unix time of the replica's last step")
    loaded_subjects: list[str] = Field(default_factory=list, description="the caller's subjects loaded there")
    latency: RecentLatency


async def _ask_replica(call, what: str, tenant: str) -> tuple[dict | None, list]:
    """One model replica's answer to ``call`` (a coroutine) within HEALTH_TIMEOUT_S, and its loaded
    model ids of ``tenant`` only (parsed); (None, []) when the replica did not answer."""
    try:
        model = await asyncio.wait_for(call, timeout=HEALTH_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure of the replica is "unavailable"
        logger.warning("%s: the model replica did not answer: %r", what, exc)
        return None, []
    own = [serving.parse_model_id(m) for m in model.get("loaded_models", [])]
    return model, [m for m in own if m.tenant == tenant]


def _unavailable() -> JSONResponse:
    return _error(503, "the model replica did not answer", {"Retry-After": "1"})


def recent_latency(recent, now: float | None = None) -> RecentLatency:
    """Percentiles of the ingress's recent generation latencies (``access.AccessMiddleware.recent``)."""
    entries = list(recent)
    if not entries:
        return RecentLatency(count=0, window_s=0.0)
    now = time.time() if now is None else now
    ms = sorted(seconds * 1000 for _, _, seconds in entries)

    def pick(q: float) -> float:
        return round(ms[min(len(ms) - 1, int(q * len(ms)))], 1)

    return RecentLatency(count=len(ms), window_s=round(now - entries[0][0], 1), p50_ms=pick(0.5),
                         p95_ms=pick(0.95), errors=sum(status >= 400 for _, status, _ in entries))


# --------------------------------------------------------------------------------------------
# Errors


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _field_error(field_name: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": ["body", field_name], "msg": message, "type": "value_error"}]})


def _clean_text(value: Any) -> str:
    """``str(value)`` that always encodes as UTF-8 (lone surrogates become '?')."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def sanitize_issue(error: dict) -> dict:
    """A pydantic/FastAPI error without ``input``, ``ctx`` or ``url``: only where and what, as plain
    JSON. Non-finite numbers, huge strings and lone surrogates in the request stay out of the answer."""
    loc = [part if isinstance(part, int) and not isinstance(part, bool) else _clean_text(part)[:100]
           for part in error.get("loc", ())]
    msg = _clean_text(error.get("msg", "invalid value"))
    reason = (error.get("ctx") or {}).get("error")
    if error.get("type") == "json_invalid" and isinstance(reason, str):
        msg = f"{msg}: {reason}"  # e.g. "JSON decode error: Expecting ',' delimiter"
    return {"loc": loc, "msg": msg[:500], "type": _clean_text(error.get("type", "value_error"))}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [sanitize_issue(e) for e in exc.errors()]})


def _install_error_handlers(api: FastAPI, args: AppArgs) -> None:
    retry = {"Retry-After": "1"}

    async def field_error(request, exc: FieldError):
        return _field_error(exc.field, exc.message)

    async def conflict(request, exc: SubjectConflict):  # handlers match the most derived class first
        return _error(409, exc.message)

    async def unusable(request, exc: SubjectUnusable):
        return _error(424, str(exc))

    async def not_found(request, exc: SubjectNotFound):
        return _error(404, str(exc))

    async def replica_lost(request, exc: ReplicaUnavailable):  # a replacement replica loads the model first
        access.reject(request, "replica_unavailable")
        return _error(503, "the model replica was lost and is being replaced, retry later",
                      {"Retry-After": str(REPLICA_RETRY_AFTER_S)})

    async def overloaded(request, exc: Overloaded):
        access.reject(request, "overloaded")
        return _error(503, "the model cannot take the request now (overloaded or restarting), retry later", retry)

    async def storage_down(request, exc: StorageError):
        logger.error("storage unavailable: %s", exc)
        access.reject(request, "storage_unavailable")
        return _error(503, "subject storage is unavailable, retry later", retry)

    async def deadline(request, exc: DeadlineExceeded):
        return _error(504, f"generation did not finish within {args.request_timeout_s:g} s")

    async def exists(request, exc: SubjectExists):
        return _error(409, str(exc))

    async def quota(request, exc: QuotaExceeded):
        principal = subjects_api.principal_of(request)
        subjects_api.audit_event(request, "quota.refused", detail={"quota": exc.quota})
        logger.info("429: quota %s of tenant %s", exc.quota, principal.tenant if principal else "default")
        access.reject(request, "quota")
        return JSONResponse({"detail": str(exc), "quota": exc.quota}, status_code=429,
                            headers={"Retry-After": str(exc.retry_after_s)})

    async def idempotency(request, exc: IdempotencyMismatch):
        return _field_error("Idempotency-Key", str(exc))

    async def internal(request, exc: Exception):
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error")

    async def http_error(request, exc: StarletteHTTPException):
        """Starlette's own answers (unknown path, method); a 405 lists every method of the path."""
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = {m for r in request.app.routes if getattr(r, "methods", None)
                       and r.path_regex.match(request.url.path) for m in r.methods}
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    api.add_exception_handler(StarletteHTTPException, http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    for kind, handler in ((QuotaExceeded, quota), (SubjectExists, exists), (IdempotencyMismatch, idempotency),
                          (FieldError, field_error), (SubjectConflict, conflict), (SubjectUnusable, unusable),
                          (SubjectNotFound, not_found), (ReplicaUnavailable, replica_lost),
                          (Overloaded, overloaded), (StorageError, storage_down),
                          (DeadlineExceeded, deadline), (Exception, internal)):
        api.add_exception_handler(kind, handler)


def _responses(args: AppArgs, *statuses: int) -> dict:
    """OpenAPI ``responses`` for the given error statuses (401 only when auth is on; then 429 too,
    for a tenant's quotas and the 401 throttle can answer any keyed route)."""
    out: dict[int, dict] = {}
    statuses = (*statuses, 429) if args.auth_enabled and 401 in statuses else statuses
    for status in sorted(set(statuses)):
        if status == 401 and not args.auth_enabled:
            continue
        entry: dict[str, Any] = {"model": ValidationErrorBody if status == 422 else ErrorBody,
                                 "description": ERRORS[status]}
        if status in (429, 503):
            entry["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        out[status] = entry
    return out


# --------------------------------------------------------------------------------------------
# Subjects


class ManifestCache:
    """A small TTL cache over ``read_manifest``.

    FileNotFoundError becomes SubjectNotFound; a manifest that does not parse or is not this
    subject's (ValueError) becomes SubjectUnusable, with the storage detail logged, not returned.
    """

    def __init__(self, read, ttl_s: float, clock=time.monotonic):
        self._read, self._ttl, self._clock = read, ttl_s, clock
        self._entries: dict[str, tuple[float, dict]] = {}

    async def get(self, subject_id: str, tenant: str = DEFAULT_TENANT) -> dict:
        key = (tenant, subject_id)
        hit = self._entries.get(key)
        if hit is not None and self._clock() - hit[0] < self._ttl:
            return hit[1]
        try:
            manifest = await asyncio.to_thread(self._read, subject_id, tenant=tenant)
        except FileNotFoundError as exc:
            raise SubjectNotFound(f"subject {subject_id!r} not found") from exc
        except ValueError as exc:
            logger.error("subject %r has a damaged manifest: %s", subject_id, exc)
            raise SubjectUnusable(f"subject {subject_id!r} is damaged in storage (its manifest cannot be "
                                  "read); fine-tune it again") from exc
        if self._ttl > 0:
            self._entries[key] = (self._clock(), manifest)
        return manifest

    def forget(self, tenant: str, subject_id: str) -> None:
        """Drop a cached manifest (its subject was deleted)."""
        self._entries.pop((tenant, subject_id), None)


# --------------------------------------------------------------------------------------------
# Middleware: API key, body size


def _needs_key(scope) -> bool:
    path = scope.get("path", "")
    if path.startswith(DOCS_STATIC + "/") or path == "/" or path.startswith(PLAYGROUND + "/"):
        return False
    if path == "/healthz":  # shallow health stays open for probes; deep health shows loaded subjects
        from urllib.parse import parse_qs

        deep = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("deep", [])
        return any(value.lower() not in ("", "0", "false", "no", "off", "f", "n") for value in deep)
    return path not in OPEN_PATHS


class AuthMiddleware:
    """ASGI middleware: 401 unless the request carries one valid key (before the body is read).

    ``keys()`` is the current ``tenants.KeyTable`` (a keys file reloaded on change, or the single
    key as tenant ``default``). The request's ``Principal`` (tenant, key id) and its ``Tenant``
    (quotas, priority) go into the scope's state for the routes. Two credentials that disagree are
    a 401 (RFC 6750), and an address with too many recent 401s waits (429 with Retry-After)."""

    def __init__(self, app, keys, throttle: tenants.FailureThrottle):
        self.app, self.keys, self.throttle = app, keys, throttle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _needs_key(scope):
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("?", 0))[0]
        wait = self.throttle.blocked(address)
        if wait > 0:
            scope.setdefault("state", {})["reject_reason"] = "unauthorized_throttle"
            return await _error(429, "too many requests with a missing or invalid API key; retry later",
                                {"Retry-After": str(max(1, int(wait + 0.999)))})(scope, receive, send)
        presented, conflict = tenants.presented_credentials(Headers(scope=scope))
        table = self.keys()
        principal = None if conflict else table.authenticate(presented)
        if principal is None:
            self.throttle.record_failure(address)
            reason = "two credentials that disagree" if conflict else "a missing or invalid key"
            logger.warning("401 on %s %s from %s: %s", scope.get("method"), scope.get("path"), address, reason)
            return await _error(401, "missing or invalid API key (send exactly one: Authorization: Bearer KEY "
                                     "or X-API-Key: KEY)", {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        state = scope.setdefault("state", {})
        state["principal"], state["tenant_info"] = principal, table.tenant(principal.tenant)
        if (scope.get("method"), scope.get("path")) not in subjects_api.IMAGE_ROUTES:
            limiter = scope["app"].state.quotas  # generate and jobs charge with their image counts
            refusal = limiter.check(principal.tenant, state["tenant_info"].quotas, 0)
            if refusal is not None:
                audit = scope["app"].state.audit
                threading.Thread(target=audit.record, args=("quota.refused", principal.tenant, principal.key_id),
                                 kwargs={"detail": {"quota": refusal.quota}}, daemon=True).start()
                return await JSONResponse({"detail": f"quota {refusal.quota} of this tenant exceeded",
                                           "quota": refusal.quota}, status_code=429,
                                          headers={"Retry-After": str(refusal.retry_after_s)})(scope, receive, send)
        return await self.app(scope, receive, send)


class SecurityHeadersMiddleware:
    """ASGI middleware: every ``/v1/*`` answer (errors included) is ``Cache-Control: no-store`` and
    ``X-Content-Type-Options: nosniff`` (images and subject state are private to their tenant)."""

    HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in dict(self.HEADERS)]
                message = {**message, "headers": kept + self.HEADERS}
            await send(message)

        return await self.app(scope, receive, with_headers)


class DocsPolicyMiddleware:
    """ASGI middleware: the docs pages carry DOCS_CSP (nothing loads from outside the server)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in DOCS_PAGES:
            return await self.app(scope, receive, send)

        async def with_policy(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"content-security-policy", DOCS_CSP.encode())]}
            await send(message)

        return await self.app(scope, receive, with_policy)


class BodyLimitMiddleware:
    """ASGI middleware: 413 when Content-Length or the bytes actually received exceed the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS") or \
                (scope.get("method") == "POST" and scope.get("path") == subjects_api.SUBJECTS_PATH):
            return await self.app(scope, receive, send)  # uploads are streamed and counted by their route
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _too_large(self.max_bytes)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _too_large(self.max_bytes)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body larger than {limit} bytes")


# --------------------------------------------------------------------------------------------
# Results


RESULT_HEADERS = {
    "Batch-Size": "requests that shared the sampler call", "Batch-Images": "images in that call",
    "Replica": "the model replica that served it",
    "Model-Id": "subject[@g<step>,e<step>]", "Seed": "the first image's seed (image k: seed + k)",
    "Sample-Seconds": "time in the sampler",
}


def _result_headers(job: GenerationJob, result: GenerationResult) -> dict[str, str]:
    values = {"Batch-Size": str(result.batch_requests), "Batch-Images": str(result.batch_images),
              "Replica": result.replica,
              "Model-Id": job.model_id, "Seed": str(job.seeds[0]),
              "Sample-Seconds": f"{result.sample_seconds:.3f}"}
    return {f"{serving.HEADER_PREFIX}{name}": value for name, value in values.items()}


def _finite(values: list[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]


def _finite_maps(attention: list[dict] | None) -> list[dict] | None:
    """The heat maps with every non-finite value (a numerical fault in a trajectory) as 0.0, so
    the answer is JSON numbers, never a failed encoding; the count is logged."""
    if attention is None:
        return None
    bad, out = 0, []
    for entry in attention:
        maps = {}
        for row, words in (entry.get("maps") or {}).items():
            maps[row] = [[[v if math.isfinite(v) else 0.0 for v in line] for line in grid] for grid in words]
            bad += sum(not math.isfinite(v) for grid in words for line in grid for v in line)
        out.append({**entry, "maps": maps})
    if bad:
        logger.warning("%d non-finite heat-map values answered as 0.0", bad)
    return out


def render_result(request: GenerateRequest, job: GenerationJob, result: GenerationResult) -> Response:
    """The answer: one PNG, or JSON with every image (and the heat maps). Blocking when it is JSON
    with maps (megabytes of numbers): the route runs it in a worker thread."""
    headers = _result_headers(job, result)
    one_png = request.response_format == "png" or (request.response_format == "auto" and len(result.pngs) == 1)
    if one_png and not request.attention_maps:
        return Response(content=result.pngs[0], media_type="image/png", headers=headers)
    body = ImagesBody(subject_id=request.subject_id, model_id=job.model_id, prompts=job.prompts, seeds=job.seeds,
                      images=[base64.b64encode(png).decode("ascii") for png in result.pngs],
                      attention_distance=_finite(result.attention_distance),
                      batch_size=result.batch_requests, replica=result.replica,
                      attention=_finite_maps(result.attention) if request.attention_maps else None)
    return JSONResponse(body.model_dump(), headers=headers)


def _generate_responses(args: AppArgs) -> dict:
    headers = {f"{serving.HEADER_PREFIX}{name}": {"description": text, "schema": {"type": "string"}}
               for name, text in RESULT_HEADERS.items()}
    ok = {"model": ImagesBody, "headers": headers,
          "description": "image/png for one image (response_format auto or png) without attention_maps, "
                         "else JSON",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
    return {200: ok, **_responses(args, 400, 401, 404, 409, 413, 422, 424, 500, 503, 504)}


# --------------------------------------------------------------------------------------------
# The app


def _add_security(api: FastAPI) -> None:
    """Declare the API key in the OpenAPI schema: required on /v1, optional (deep only) on /healthz."""
    build = api.openapi

    def openapi() -> dict:
        if api.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    operation["security"] = [{}, *SECURITY] if path == "/healthz" else SECURITY
        return api.openapi_schema

    api.openapi = openapi


def _add_playground(api: FastAPI) -> None:
    """The playground page at ``/`` and its assets under PLAYGROUND, each with PLAYGROUND_CSP."""
    package = resources.files(__package__).joinpath("playground")
    files = {name: package.joinpath(name).read_bytes() for name in PLAYGROUND_FILES}
    headers = {"Content-Security-Policy": PLAYGROUND_CSP, "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache"}

    @api.get("/", include_in_schema=False)
    async def playground() -> Response:
        return Response(files["index.html"], media_type=PLAYGROUND_FILES["index.html"], headers=headers)

    @api.get(PLAYGROUND + "/{name}", include_in_schema=False)
    async def playground_asset(name: str) -> Response:
        if name not in files or name == "index.html":
            return _error(404, "no such playground file")
        return Response(files[name], media_type=PLAYGROUND_FILES[name], headers=headers)


def make_api(args: AppArgs, backend: serving.Backend, read_manifest, list_subjects, read_collapse_plot,
             subject_service: "subjects_api.SubjectsService | None" = None, behind_proxy: bool = False) -> FastAPI:
    """The FastAPI app of the ingress. Blocking storage I/O, run in worker threads:
    ``read_manifest(subject_id) -> dict``, ``list_subjects(after, limit) -> list[str]`` (complete
    subjects, sorted, after the cursor) and ``read_collapse_plot(subject_id) -> bytes`` (a PNG;
    FileNotFoundError when absent). ``behind_proxy``: Serve's HTTP proxy returns the request id
    (``serving/access.py``)."""
    from fastapi_offline import FastAPIOffline

    audit = AuditLog(args.storage_root)
    def reloaded(old, new) -> None:  # in the background: the reload happens on the event loop
        threading.Thread(target=audit.record, args=("keys.reload", "-", "-"), daemon=True,
                         kwargs={"detail": {"tenants": len(new.tenants), "entries": len(new.key_ids)}}).start()

    key_source = serving.key_source(args, on_reload=reloaded)
    service = subject_service if args.subjects_service else None
    manifests = ManifestCache(read_manifest, args.manifest_cache_s)
    Request_ = serving.request_model(args)
    api = FastAPIOffline(
        title="DreamBlend", version="1", static_url=DOCS_STATIC,
        swagger_ui_parameters={"validatorUrl": None},  # no call to the public validator badge
        description="DreamBlend images of fine-tuned subjects (Ray Serve). When auth is on, send the API key "
                    "as `Authorization: Bearer KEY` or `X-API-Key: KEY`.\n\nErrors (JSON; 422 lists the fields "
                    "in `detail[].loc`, the others say one sentence in `detail`):\n\n"
                    + "\n".join(f"- **{status}** {text}" for status, text in ERRORS.items()))
    _install_error_handlers(api, args)
    api.state.quotas = QuotaLimiter(share=1 / args.ingress_replicas)  # per-replica buckets (serving/quotas.py)
    api.state.audit = audit
    api.add_middleware(BodyLimitMiddleware, max_bytes=args.max_body_bytes)
    api.add_middleware(DocsPolicyMiddleware)
    if args.auth_enabled:
        api.add_middleware(AuthMiddleware, keys=key_source, throttle=tenants.FailureThrottle(
            limit=args.auth_failures_per_minute, window_s=60.0))  # added late: runs early
        _add_security(api)
    api.add_middleware(SecurityHeadersMiddleware)  # on every answer, the 401s included
    api.state.recent = collections.deque(maxlen=access.RECENT)  # the generation routes' last latencies
    api.add_middleware(access.AccessMiddleware, recent=api.state.recent, echo_request_id=not behind_proxy,
                       auth_enabled=args.auth_enabled)  # added last: outermost, sees every answer
    _add_playground(api)
    subject_path = Path(pattern=SUBJECT_ID_PATTERN.pattern, description="a subject id: [A-Za-z0-9_-], 1 to 64",
                        examples=["dog"])

    @api.get("/healthz", response_model=Health, summary="Liveness; deep: one model replica",
             responses=_responses(args, 401, 422, 500, 503))
    async def healthz(http_request: Request,
                      deep: Annotated[bool, Query(description="also ask one model replica (needs the key "
                                                              "when auth is on)")] = False) -> Health:
        """Liveness of the ingress (open to probes); ``?deep=true`` also reports one model replica,
        with the caller's own loaded subjects only."""
        if not deep:
            return Health()
        model, own = await _ask_replica(backend.model_health(), "deep health", tenant_of(http_request))
        if model is None:
            return _unavailable()
        model["loaded_models"] = [serving.model_id_for(m.subject_id, m.guidance_step, m.edit_step) for m in own]
        return Health(model=model)

    @api.get("/v1/status", response_model=StatusView, summary="The batch at work: queue, rows per step, latencies",
             responses=_responses(args, 401, 500, 503))
    async def status(http_request: Request) -> StatusView:
        """One model replica's queue depth, active rows, images per UNet call and step time over its
        recent steps, the guidance share of that time, the caller's loaded subjects, and this
        ingress's recent generation latencies (what the playground's status panel polls)."""
        model, own = await _ask_replica(backend.model_status(), "status", tenant_of(http_request))
        if model is None:
            return _unavailable()
        subjects = sorted({m.subject_id for m in own})
        fields = {name: model.get(name) for name in StatusView.model_fields if name in model}
        return StatusView(**fields, loaded_subjects=subjects, latency=recent_latency(api.state.recent))

    @api.get("/v1/subjects", response_model=SubjectList, summary="Complete subjects, a page at a time",
             responses=_responses(args, 401, 422, 500, 503))
    async def subjects(http_request: Request,
                       limit: Annotated[int, Query(ge=1, le=MAX_SUBJECTS_PAGE, description="ids per page")] = 50,
                       after: Annotated[str | None, Query(pattern=SUBJECT_ID_PATTERN.pattern,
                                                          description="the previous page's `next`")] = None,
                       status: Annotated[Literal["queued", "training", "ready", "failed", "canceled"] | None,
                                         Query(description="only subjects in this state (default: ready)")] = None
                       ) -> SubjectList:
        """Ids of the ready subjects (or those in ``status``), sorted; page on with ``after=<next>``."""
        tenant = tenant_of(http_request)
        lister = partial(list_subjects, tenant=tenant) if status in (None, "ready") else \
            partial(subjects_api.ids_with_status, tenant_root(args.storage_root, tenant), status)
        ids = await asyncio.to_thread(lister, after, limit + 1)  # one more: is there a next page?
        page = ids[:limit]
        return SubjectList(subjects=page, next=page[-1] if len(ids) > limit else None)

    @api.get("/v1/subjects/{subject_id}/collapse.png", response_model=None,
             summary="A subject's attention-probe plot",
             responses={200: {"description": "the plot written by the attention probe during fine-tuning",
                              "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                        **_responses(args, 401, 404, 422, 424, 500, 503)})
    async def collapse_plot(http_request: Request, subject_id: Annotated[str, subject_path]) -> Response:
        """The attention probe's plot of a subject (PNG); 404 when the subject or its plot is absent."""
        tenant = tenant_of(http_request)
        try:
            plot = await asyncio.to_thread(read_collapse_plot, subject_id, tenant=tenant)
        except FileNotFoundError:
            await manifests.get(subject_id, tenant)  # 404 "not found" (or 424) when the subject itself is absent
            raise SubjectNotFound(f"subject {subject_id!r} has no attention-probe plot (it was fine-tuned "
                                  "without the probe)") from None
        return Response(content=plot, media_type="image/png")

    @api.get("/v1/subjects/{subject_id}", response_model=SubjectView, operation_id="get_subject",
             summary="A subject's status and, when ready, its saved steps and base",
             responses=_responses(args, 401, 404, 422, 424, 500, 503))
    async def subject(http_request: Request, subject_id: Annotated[str, subject_path]) -> SubjectView:
        """A subject's status (``queued``, ``training`` with progress, ``ready``, ``failed`` with its
        reason, ``canceled``) and, once ready, its saved steps, default pair and base model name."""
        tenant = tenant_of(http_request)
        root = tenant_root(args.storage_root, tenant)
        positions = await service.positions(tenant) if service is not None else {}
        try:
            view = SubjectView.of(await manifests.get(subject_id, tenant))
        except SubjectUnusable:
            raise
        except SubjectNotFound:
            state = await asyncio.to_thread(subjects_api.subject_state, root, subject_id, positions)
            return SubjectView(**state.model_dump(exclude={"replayed"}))
        if service is None:
            return view
        state = await asyncio.to_thread(subjects_api.subject_state, root, subject_id, positions)
        return view.model_copy(update=state.model_dump(exclude={"replayed", "subject_id", "class_noun", "token"}))

    @api.post("/v1/generate", response_model=None, summary="DreamBlend images of a subject",
              responses=_generate_responses(args))
    async def generate(request: Request_, http_request: Request) -> Response:
        """DreamBlend images of a subject. One image: image/png (unless response_format=json).

        Rules beyond the schema: ``guidance_steps`` <= the step count (``num_inference_steps`` or the
        default); ``guidance_step``/``edit_step`` must be saved steps of the subject
        (``GET /v1/subjects/{id}`` lists them)."""
        serving.check_limits(request, args)
        tenant = tenant_of(http_request)
        try:
            manifest = await manifests.get(request.subject_id, tenant)
        except SubjectUnusable:
            raise
        except SubjectNotFound:  # a 409 naming the status when it exists but is not ready
            await asyncio.to_thread(subjects_api.require_ready, tenant_root(args.storage_root, tenant),
                                    request.subject_id)
            raise
        request = serving.canonical_overrides(request, manifest)
        subjects_api.charge(http_request, len(request.prompt_list) * request.num_images)
        seed = serving.random_seed() if request.seed is None else request.seed
        job = serving.build_job(request, args, seed, tenant=tenant)
        try:
            result = await asyncio.wait_for(backend.generate(job), timeout=args.request_timeout_s)
        except TimeoutError as exc:  # asyncio.TimeoutError is TimeoutError
            raise DeadlineExceeded(str(exc)) from exc
        if request.attention_maps or len(result.pngs) > 1:  # JSON encoding off the event loop
            return await asyncio.to_thread(render_result, request, job, result)
        return render_result(request, job, result)

    subjects_api.add_subject_routes(api, args, service, Request_,
                                    partial(_responses, args), manifests.forget)
    return api

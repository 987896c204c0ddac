"""The HTTP serving logic of DreamBlend, independent of Ray.

Ray Serve wiring lives in ``dreamblend_ray/serve_app.py`` (and ``deployments/app.py`` re-exports
it); this module holds what can be tested without a cluster:

- ``AppArgs``: the typed arguments of the application builder (limits, batching, autoscaling, auth).
- ``GenerateRequest``: the pydantic body of ``POST /v1/generate`` and its expansion into a
  ``GenerationJob`` (one prompt and one seed per image: image ``k`` uses ``seed + k``).
- Model ids for ``@serve.multiplexed``: ``"subject"``, ``"subject@g100"``, ``"subject@e400"`` or
  ``"subject@g100,e400"`` (guidance/edit checkpoint step overrides).
- ``group_jobs`` / ``run_group``: how a batch of jobs becomes sampler calls. Jobs share a call only
  when they have the same model id and sampling settings (a missing negative prompt is ""), and
  the sampler is batch invariant, so every request gets exactly the images it would get served alone.
- PNG encoding, API-key loading and constant-time checking, a request-body size limit.
- ``make_api(args, backend)``: the FastAPI app (routes, error mapping) over a ``Backend``.

Error mapping (never a 500 for bad input): unknown subject 404, invalid field 422 (the field is
named in ``detail[].loc``), body too large 413, missing/wrong API key 401, overload 503, timeout 504.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from dreamblend_ray.config import SUBJECT_ID_PATTERN, SamplingConfig
from dreamblend_ray.dtypes import normalize_dtype

logger = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1
HEADER_PREFIX = "X-DreamBlend-"


# --------------------------------------------------------------------------------------------
# Application arguments


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` block of deployments/serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field("embedded", description="base model: 'embedded', 'tiny', a directory or s3:// URI")
    storage_root: str = Field("./dreamblend-storage", description="root holding subjects/{id}/ (path or s3://)")
    device: str | None = Field(None, description="torch device; default CUDA when present, else CPU")
    dtype: Annotated[str | None, BeforeValidator(normalize_dtype)] = Field(
        None, description="fp32 | fp16 | bf16 (float32/float16/bfloat16 accepted); default fp32 on CPU, "
                          "bf16/fp16 on GPU")
    # request limits
    max_images_per_request: int = Field(4, ge=1, le=256)
    max_prompts: int = Field(4, ge=1, le=256)
    max_inference_steps: int = Field(100, ge=1, le=1000)
    max_body_bytes: int = Field(16384, ge=256, le=16 * 2**20)
    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    # defaults of the sampling settings a request may leave out
    default_steps: int = Field(30, ge=1, le=1000)
    default_guidance_scale: float = Field(3.0, ge=0, le=50)
    default_alpha: float = Field(0.25, ge=0, le=10)
    # batching and multiplexing
    max_batch_size: int = Field(8, ge=1, le=256, description="requests per @serve.batch call")
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)
    max_models_per_replica: int = Field(4, ge=1, le=1024, description="subject pairs kept per replica (LRU)")
    manifest_cache_s: float = Field(5.0, ge=0, le=3600, description="ingress cache of subject manifests")
    # replicas and back-pressure
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(4.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    max_ongoing_requests: int = Field(16, ge=1, description="per model replica; >= max_batch_size")
    max_queued_requests: int = Field(64, ge=-1, description="per caller of the model; -1 = unbounded")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.25, ge=0)
    env_vars: dict[str, str] = Field(default_factory=dict,
                                     description="extra environment of both deployments' replicas")
    # auth
    auth_enabled: bool = False
    api_key_env: str = Field("DREAMBLEND_API_KEY", description="environment variable holding the key")
    api_key_file: str | None = Field(None, description="file holding the key (a mounted Kubernetes secret)")

    @model_validator(mode="after")
    def _consistent(self) -> "AppArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must be within [min_replicas, max_replicas]")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if self.default_steps > self.max_inference_steps:
            raise ValueError("default_steps must be <= max_inference_steps")
        return self

    def autoscaling_config(self) -> dict:
        config = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        return config


def load_api_key(args: AppArgs) -> str | None:
    """The API key from ``api_key_file`` (a mounted secret) or else ``$api_key_env``; None if unset.

    Raises ValueError when auth is enabled and no non-empty key is found, so a misconfigured
    deployment fails at start-up instead of serving without protection.
    """
    key = None
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as handle:
                key = handle.read().strip()
        except OSError as exc:
            if args.auth_enabled:
                raise ValueError(f"api_key_file {args.api_key_file!r} is not readable: {exc}") from exc
    if not key:
        key = os.environ.get(args.api_key_env, "").strip() or None
    if args.auth_enabled and not key:
        raise ValueError(f"auth_enabled is true but no API key was found in api_key_file or ${args.api_key_env}")
    return key


def presented_key(headers) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


def key_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison (hmac.compare_digest) of the presented and expected keys."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Request body and the job it becomes


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate``. Give ``prompt`` or ``prompts``; ``num_images`` per prompt."""

    model_config = ConfigDict(extra="forbid")

    subject_id: str = Field(pattern=SUBJECT_ID_PATTERN.pattern, description="a fine-tuned subject")
    prompt: str | None = Field(None, min_length=1, max_length=2000)
    prompts: list[str] | None = Field(None, min_length=1)
    negative_prompt: str | None = Field(None, max_length=2000)
    num_images: int = Field(1, ge=1, description="images per prompt")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image k uses seed + k; random if absent")
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    alpha: float | None = Field(None, ge=0, le=10, allow_inf_nan=False)
    guidance_steps: int | None = Field(None, ge=0, description="K: how many first steps are guided")
    guidance_step: int | None = Field(None, ge=0, description="override: checkpoint step of G")
    edit_step: int | None = Field(None, ge=0, description="override: checkpoint step of E")
    response_format: Literal["auto", "png", "json"] = Field(
        "auto", description="auto: image/png for one image, JSON with base64 PNGs otherwise")

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for text in value:
                if not text or len(text) > 2000:
                    raise ValueError("each prompt must be 1 to 2000 characters long")
        return value

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' or 'prompts'")
        return self

    @property
    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts)


class FieldError(ValueError):
    """A request field violates a configured limit: answered 422 with the field named."""

    def __init__(self, field_name: str, message: str):
        super().__init__(field_name, message)  # both in .args, so it pickles across Ray
        self.field = field_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SubjectNotFound(LookupError):
    """No complete subject (no subject.json, or a missing checkpoint): answered 404."""


class Overloaded(RuntimeError):
    """The model deployment's queue is full: answered 503 with Retry-After."""


class DeadlineExceeded(TimeoutError):
    """The request ran past ``request_timeout_s``: answered 504."""


@dataclass(frozen=True)
class SamplingSettings:
    """The settings that must match for jobs to share one sampler call (hashable)."""

    num_inference_steps: int
    guidance_scale: float
    alpha: float
    guidance_steps: int | None

    def to_config(self) -> SamplingConfig:
        return SamplingConfig(num_inference_steps=self.num_inference_steps,
                              guidance_scale=self.guidance_scale, alpha=self.alpha,
                              guidance_steps=self.guidance_steps)


@dataclass
class GenerationJob:
    """What the ingress sends to the model deployment: one prompt and seed per image."""

    model_id: str
    prompts: list[str]
    seeds: list[int]
    settings: SamplingSettings
    negative_prompts: list[str] | None = None
    deadline: float = float("inf")  # time.time() after which the result is no longer wanted

    @property
    def group_key(self) -> tuple:
        return (self.model_id, self.settings)


@dataclass
class GenerationResult:
    """What the model deployment returns for one job."""

    pngs: list[bytes]
    seeds: list[int]
    batch_requests: int  # requests that shared the sampler call
    batch_images: int  # images in that call
    replica: str
    loaded_models: list[str] = field(default_factory=list)
    sample_seconds: float = 0.0
    attention_distance: list[float] = field(default_factory=list)  # mean over guided steps, per image


def model_id_for(subject_id: str, guidance_step: int | None = None, edit_step: int | None = None) -> str:
    """The multiplexed model id: ``subject`` or ``subject@g100``, ``subject@e400``, ``subject@g100,e400``."""
    parts = []
    if guidance_step is not None:
        parts.append(f"g{guidance_step}")
    if edit_step is not None:
        parts.append(f"e{edit_step}")
    return subject_id if not parts else f"{subject_id}@{','.join(parts)}"


def parse_model_id(model_id: str) -> tuple[str, int | None, int | None]:
    """Inverse of ``model_id_for``; ValueError on anything else."""
    subject_id, at, overrides = model_id.partition("@")
    if not SUBJECT_ID_PATTERN.fullmatch(subject_id):
        raise ValueError(f"model id {model_id!r} does not start with a valid subject id")
    steps: dict[str, int] = {}
    for part in filter(None, overrides.split(",")):
        if part[:1] not in ("g", "e") or not part[1:].isdigit() or part[0] in steps:
            raise ValueError(f"model id {model_id!r}: bad override {part!r} (want g<step> or e<step>)")
        steps[part[0]] = int(part[1:])
    if at and not steps:
        raise ValueError(f"model id {model_id!r} has an empty override list")
    return subject_id, steps.get("g"), steps.get("e")


def check_limits(request: GenerateRequest, args: AppArgs) -> None:
    """Configured limits (FieldError naming the field)."""
    prompts = request.prompt_list
    if len(prompts) > args.max_prompts:
        raise FieldError("prompts", f"at most {args.max_prompts} prompts per request, got {len(prompts)}")
    total = len(prompts) * request.num_images
    if total > args.max_images_per_request:
        raise FieldError("num_images", f"at most {args.max_images_per_request} images per request "
                                       f"(prompts x num_images), got {total}")
    steps = request.num_inference_steps
    if steps is not None and steps > args.max_inference_steps:
        raise FieldError("num_inference_steps", f"at most {args.max_inference_steps}, got {steps}")
    if request.response_format == "png" and total != 1:
        raise FieldError("response_format", f"'png' returns exactly one image; this request makes {total} "
                                            "(use 'json' or 'auto')")


def canonical_overrides(request: GenerateRequest, manifest: dict) -> GenerateRequest:
    """Check step overrides against the saved checkpoints; drop those equal to the manifest's
    defaults, so that one (G, E) choice has one model id."""
    saved = manifest.get("steps") or []
    changes = {}
    for name in ("guidance_step", "edit_step"):
        value = getattr(request, name)
        if value is None:
            continue
        if saved and value not in saved:
            raise FieldError(name, f"subject {request.subject_id!r} has no checkpoint at step {value} "
                                   f"(saved: {sorted(saved)})")
        if value == manifest.get(name):
            changes[name] = None
    return request.model_copy(update=changes) if changes else request


def sampling_settings(request: GenerateRequest, args: AppArgs) -> SamplingSettings:
    """Fill defaults and validate through SamplingConfig (its ValueError names the field)."""
    settings = SamplingSettings(
        num_inference_steps=request.num_inference_steps or args.default_steps,
        guidance_scale=args.default_guidance_scale if request.guidance_scale is None else request.guidance_scale,
        alpha=args.default_alpha if request.alpha is None else request.alpha,
        guidance_steps=request.guidance_steps)
    try:
        settings.to_config()
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise FieldError(name if name in GenerateRequest.model_fields else "body", str(exc)) from exc
    return settings


def build_job(request: GenerateRequest, args: AppArgs, seed: int, now: float | None = None) -> GenerationJob:
    """Expand a validated request into one (prompt, seed) per image; image k uses seed + k."""
    prompts = [p for p in request.prompt_list for _ in range(request.num_images)]
    seeds = [(seed + k) % (MAX_SEED + 1) for k in range(len(prompts))]
    negatives = None if request.negative_prompt is None else [request.negative_prompt] * len(prompts)
    start = time.time() if now is None else now
    return GenerationJob(model_id=model_id_for(request.subject_id, request.guidance_step, request.edit_step),
                         prompts=prompts, seeds=seeds, settings=sampling_settings(request, args),
                         negative_prompts=negatives, deadline=start + args.request_timeout_s)


def random_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


# --------------------------------------------------------------------------------------------
# Batching: jobs -> sampler calls -> per-job results


def group_jobs(jobs: list[GenerationJob]) -> list[list[int]]:
    """Indices of jobs that can share one sampler call, in arrival order."""
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.group_key, []).append(index)
    return list(groups.values())


def take_group(pending: list[GenerationJob], max_requests: int) -> list[int]:
    """Indices of the oldest pending job and the later ones of its group, at most ``max_requests``."""
    if not pending:
        return []
    key = pending[0].group_key
    return [i for i, job in enumerate(pending) if job.group_key == key][:max_requests]


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_group(sampler, pair, jobs: list[GenerationJob], callback=None) -> list[tuple[list[bytes], list[float], float]]:
    """One sampler call for jobs of one group; returns (pngs, distances, seconds) per job.

    Blocking: call it in a worker thread, holding the replica's model lock.
    """
    prompts = [p for job in jobs for p in job.prompts]
    seeds = [s for job in jobs for s in job.seeds]
    negatives = None  # the sampler reads None as "" for every sample (diffusers' convention)
    if any(job.negative_prompts is not None for job in jobs):
        negatives = [n for job in jobs for n in (job.negative_prompts or [""] * len(job.prompts))]
    result = sampler.sample(pair, prompts, seeds, jobs[0].settings.to_config(),
                            negative_prompts=negatives, callback=callback)
    distances = _mean_distances(result.attention_distance, len(prompts))
    out, start = [], 0
    for job in jobs:
        stop = start + len(job.prompts)
        out.append(([encode_png(img) for img in result.images[start:stop]], distances[start:stop],
                    float(result.seconds)))
        start = stop
    return out


def _mean_distances(distance, count: int) -> list[float]:
    """Per-sample mean of the (B, K) attention distance; NaN-free, empty K gives 0."""
    try:
        if distance is None or distance.numel() == 0:
            return [0.0] * count
        return [float(v) for v in distance.float().reshape(count, -1).mean(dim=1)]
    except (AttributeError, RuntimeError):
        return [0.0] * count


# --------------------------------------------------------------------------------------------
# HTTP


class Backend(Protocol):
    """What the HTTP layer needs from the deployment (the Ray ingress implements it)."""

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """Raises SubjectNotFound, FieldError, Overloaded or DeadlineExceeded for the client's errors."""

    async def model_health(self) -> dict:
        """Health of one model replica."""


class ManifestCache:
    """A small TTL cache over ``read_manifest``; FileNotFoundError becomes SubjectNotFound."""

    def __init__(self, read, ttl_s: float, clock=time.monotonic):
        self._read, self._ttl, self._clock = read, ttl_s, clock
        self._entries: dict[str, tuple[float, dict]] = {}

    async def get(self, subject_id: str) -> dict:
        hit = self._entries.get(subject_id)
        if hit is not None and self._clock() - hit[0] < self._ttl:
            return hit[1]
        try:
            manifest = await asyncio.to_thread(self._read, subject_id)
        except FileNotFoundError as exc:
            raise SubjectNotFound(f"subject {subject_id!r} not found") from exc
        if self._ttl > 0:
            self._entries[subject_id] = (self._clock(), manifest)
        return manifest


class BodyLimitMiddleware:
    """ASGI middleware: 413 when Content-Length or the bytes actually received exceed the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
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
    return JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)


def _field_error(field_name: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": ["body", field_name], "msg": message, "type": "value_error"}]})


def _result_headers(job: GenerationJob, result: GenerationResult) -> dict[str, str]:
    return {
        f"{HEADER_PREFIX}Batch-Size": str(result.batch_requests),
        f"{HEADER_PREFIX}Batch-Images": str(result.batch_images),
        f"{HEADER_PREFIX}Replica": result.replica,
        f"{HEADER_PREFIX}Loaded-Models": ",".join(result.loaded_models),
        f"{HEADER_PREFIX}Model-Id": job.model_id,
        f"{HEADER_PREFIX}Seed": str(job.seeds[0]),
        f"{HEADER_PREFIX}Sample-Seconds": f"{result.sample_seconds:.3f}",
    }


def render_result(request: GenerateRequest, job: GenerationJob, result: GenerationResult) -> Response:
    headers = _result_headers(job, result)
    if request.response_format == "png" or (request.response_format == "auto" and len(result.pngs) == 1):
        return Response(content=result.pngs[0], media_type="image/png", headers=headers)
    body = {
        "subject_id": request.subject_id,
        "model_id": job.model_id,
        "prompts": job.prompts,
        "seeds": job.seeds,
        "images": [base64.b64encode(png).decode("ascii") for png in result.pngs],
        "attention_distance": result.attention_distance,
        "batch_size": result.batch_requests,
        "replica": result.replica,
    }
    return JSONResponse(body, headers=headers)


def make_api(args: AppArgs, backend: Backend, read_manifest) -> FastAPI:
    """The FastAPI app of the ingress. ``read_manifest(subject_id) -> dict`` is blocking storage I/O."""
    api_key = load_api_key(args)
    manifests = ManifestCache(read_manifest, args.manifest_cache_s)
    api = FastAPI(title="DreamBlend", version="1",
                  description="DreamBlend images of fine-tuned subjects (Ray Serve). "
                              "Send the API key as `Authorization: Bearer KEY` or `X-API-Key` when auth is on.")

    @api.middleware("http")
    async def authenticate(request: Request, call_next):
        open_paths = ("/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect")
        if args.auth_enabled and request.url.path not in open_paths:
            if not key_matches(presented_key(request.headers), api_key):
                return JSONResponse({"detail": "missing or invalid API key"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    api.add_middleware(BodyLimitMiddleware, max_bytes=args.max_body_bytes)

    @api.get("/healthz")
    async def healthz(deep: bool = False) -> dict:
        """Liveness of the ingress; ``?deep=true`` also asks one model replica (its loaded models, memory)."""
        body: dict[str, Any] = {"status": "ok"}
        if deep:
            body["model"] = await backend.model_health()
        return body

    @api.get("/v1/subjects/{subject_id}")
    async def subject(subject_id: str) -> JSONResponse:
        """The subject's manifest (subject.json)."""
        if not SUBJECT_ID_PATTERN.match(subject_id):
            return _field_error("subject_id", "subject_id must match [A-Za-z0-9_-], 1 to 64 characters")
        try:
            return JSONResponse(await manifests.get(subject_id))
        except SubjectNotFound as exc:
            return JSONResponse({"detail": str(exc)}, status_code=404)

    @api.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def generate(request: GenerateRequest) -> Response:
        """DreamBlend images of a subject. One image: image/png (unless response_format=json)."""
        try:
            check_limits(request, args)
            request = canonical_overrides(request, await manifests.get(request.subject_id))
            seed = random_seed() if request.seed is None else request.seed
            job = build_job(request, args, seed)
            result = await asyncio.wait_for(backend.generate(job), timeout=args.request_timeout_s)
        except FieldError as exc:
            return _field_error(exc.field, exc.message)
        except SubjectNotFound as exc:
            return JSONResponse({"detail": str(exc)}, status_code=404)
        except Overloaded as exc:
            return JSONResponse({"detail": f"overloaded, retry later: {exc}"}, status_code=503,
                                headers={"Retry-After": "1"})
        except (asyncio.TimeoutError, TimeoutError):  # DeadlineExceeded included
            return JSONResponse({"detail": f"generation did not finish within {args.request_timeout_s} s"},
                                status_code=504)
        return render_result(request, job, result)

    return api

"""The subject service over HTTP: create (upload), follow, cancel, delete; asynchronous jobs.

    POST   /v1/subjects                 multipart images (or JSON image_uris) -> 202 {id, status: queued}
    GET    /v1/subjects/{id}            status, progress, queue position, timestamps, error (+ the pair when ready)
    POST   /v1/subjects/{id}/cancel     -> 202
    DELETE /v1/subjects/{id}            -> 204, everything stored for it erased
    POST   /v1/jobs                     a /v1/generate body or {requests: [...]} -> 202 {id}
    GET    /v1/jobs/{id}                status, progress, results
    GET    /v1/jobs/{id}/images/{n}     image n (PNG)

Every upload is checked (``io.uploads``) before anything is stored, and sources named by URI are
checked against the operator's prefixes and hosts (``io.netguard``) before anything is read. The
state changes themselves happen in the scheduler actor (``lifecycle.scheduler``), reached through
a ``SubjectsService``; reads come straight from storage (``lifecycle.records``).
"""


import asyncio
import hashlib
import json
import logging
import secrets
import threading
from typing import Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from dreamblend_ray.config import (CLASS_NOUN_PATTERN, DEFAULT_TENANT, SUBJECT_ID_PATTERN, TOKEN_PATTERN, FinetuneConfig,
                                   from_dict, to_dict)
from dreamblend_ray.io import netguard, storage, uploads
from dreamblend_ray.observability import context
from dreamblend_ray.lifecycle import async_jobs, records, webhooks
from dreamblend_ray.lifecycle.scheduler import QuotaExceeded
from dreamblend_ray.training.layout import tenant_root
from dreamblend_ray.serving import requests as serving
from dreamblend_ray.serving.requests import AppArgs, FieldError, SubjectConflict, SubjectNotFound

logger = logging.getLogger(__name__)

SUBJECTS_PATH = "/v1/subjects"
MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers beside the files
JOB_ID_PATTERN = r"^job-[0-9a-f]{16}$"
IDEMPOTENCY_KEY_MAX = 255


class SubjectsService(Protocol):
    """The scheduler's calls the routes make (the actor through ``ActorService``, or in-process)."""

    async def reserve(self, record: dict, idempotency: "tuple[str, str] | None" = None) -> dict: ...
    async def commit(self, subject_id: str, images: list[str]) -> dict: ...
    async def cancel(self, subject_id: str) -> dict | None: ...
    async def delete(self, subject_id: str, webhook_url: str | None = None) -> bool: ...
    async def positions(self) -> dict[str, int]: ...
    async def submit_job(self, record: dict) -> dict: ...


class ActorService:
    """``SubjectsService`` over the scheduler actor's handle; its ValueErrors arrive as themselves."""

    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, name: str):
        method = getattr(self.handle, name)

        async def call(*args, **kwargs):
            from ray.exceptions import RayTaskError

            try:
                return await method.remote(*args, **kwargs)
            except RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                raise (cause.cause if isinstance(getattr(cause, "cause", None), ValueError) else cause) from None

        return call


# --------------------------------------------------------------------------------------------
# Bodies


class Progress(BaseModel):
    step: int = Field(description="optimizer steps done")
    total: int = Field(description="optimizer steps of the run")
    checkpoints: list[int] = Field(description="checkpoint steps saved so far")
    attempt: int = Field(1, description="1, or more after a worker died and the training resumed")


class SubjectState(BaseModel):
    """A subject's lifecycle: where it is, since when, and why it failed."""

    subject_id: str
    status: Literal["queued", "training", "ready", "failed", "canceled"]
    class_noun: str | None = None
    token: str | None = None
    progress: Progress | None = None
    queue_position: int | None = Field(None, description="1 = next to train; null unless queued")
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = Field(None, description="why it failed")
    replayed: bool | None = Field(None, description="create only: true when an Idempotency-Key returned the "
                                                    "subject an earlier request created")


class CreateSubjectJSON(BaseModel):
    """``POST /v1/subjects`` as JSON: images named by storage URI (or https from allow-listed hosts)."""

    model_config = ConfigDict(extra="forbid")

    class_noun: str = Field(pattern=CLASS_NOUN_PATTERN.pattern, examples=["dog"])
    image_uris: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(min_length=1, max_length=1000)
    subject_id: str | None = Field(None, pattern=SUBJECT_ID_PATTERN.pattern, description="default: generated")
    token: str | None = Field(None, pattern=TOKEN_PATTERN.pattern, description="default: sks")
    webhook_url: str | None = Field(None, max_length=2048, description="where state changes are POSTed (signed)")
    steps: int | None = Field(None, ge=1, le=1_000_000)
    method: Literal["lora", "full"] | None = None
    rank: int | None = Field(None, ge=1, le=1024)
    retention_days: int | None = Field(None, ge=1, le=36500)


JOBS_DOC = "``POST /v1/jobs`` with several requests (each a ``/v1/generate`` body)."


class JobResult(BaseModel):
    n: int
    subject_id: str
    prompt: str
    seed: int
    status: Literal["succeeded", "failed"]
    error: str | None = None
    url: str | None = Field(None, description="GET it for the PNG")


class JobView(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    images_total: int
    images_done: int
    created_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    results: list[JobResult] | None = None


# --------------------------------------------------------------------------------------------
# Reading state


def principal_of(request: Request):
    """The authenticated (tenant, key id) of a request (``serving.tenants.Principal``), or None
    with auth off: the middleware put it in the request's scope."""
    return request.scope.get("state", {}).get("principal")


IMAGE_ROUTES = (("POST", "/v1/generate"), ("POST", "/v1/jobs"))  # charged with their images by the route


def charge(request: Request, images: int = 0) -> None:
    """Charge one request (and ``images`` images) to the caller's tenant's rate quotas; QuotaExceeded
    (429) naming the quota when a bucket cannot pay. No-op with auth off or without quotas."""
    limiter, principal = getattr(request.app.state, "quotas", None), principal_of(request)
    if limiter is None or principal is None:
        return
    refusal = limiter.check(principal.tenant, quotas_of(request), images)
    if refusal is not None:
        raise QuotaExceeded(refusal.quota, f"quota {refusal.quota} of this tenant exceeded; retry after "
                                           f"{refusal.retry_after_s} s", refusal.retry_after_s)


def request_id_of(request: Request) -> str | None:
    """The request's id as the access middleware accepted it (never the raw header)."""
    return getattr(request.state, "request_id", None) or context.current_request_id()


def audit_event(request: Request, action: str, target: str | None = None, detail: dict | None = None) -> None:
    """Append an audit event (tenant, key id, action, target, request id) in the background: an audit
    write never delays or fails the request (``lifecycle.audit``)."""
    log = getattr(request.app.state, "audit", None)
    if log is None:
        return
    principal = principal_of(request)
    tenant, key_id = (principal.tenant, principal.key_id) if principal is not None else (DEFAULT_TENANT, "-")
    threading.Thread(target=log.record, args=(action, tenant, key_id), daemon=True,
                     kwargs={"target": target, "request_id": request_id_of(request),
                             "detail": detail}).start()


def quotas_of(request: Request):
    """The tenant's quotas (``serving.tenants.Quotas``), or None: no limits."""
    tenant = request.scope.get("state", {}).get("tenant_info")
    return None if tenant is None else tenant.quotas


def tenant_of(request: Request) -> str:
    """The tenant the request's key belongs to (``default`` with auth off or a single key)."""
    principal = principal_of(request)
    return principal.tenant if principal is not None else DEFAULT_TENANT


def subject_state(root: str, subject_id: str, positions: dict[str, int]) -> SubjectState:
    """What GET answers; SubjectNotFound when there is no such subject (or it is being deleted)."""
    status, record = records.status_of(root, subject_id)
    if status == "missing":
        raise SubjectNotFound(f"subject {subject_id!r} not found")
    record = record or {}
    progress = records.read_progress(root, subject_id)
    return SubjectState(
        subject_id=subject_id, status=status, class_noun=record.get("class_noun"), token=record.get("token"),
        progress=Progress(**{k: progress[k] for k in ("step", "total", "checkpoints", "attempt") if k in progress})
        if progress else None,
        queue_position=positions.get(subject_id) if status == "queued" else None,
        created_at=record.get("created_at"), started_at=record.get("started_at"),
        finished_at=record.get("finished_at"), error=record.get("error"))


def ids_with_status(root: str, status: str, after: str | None, limit: int) -> list[str]:
    """Sorted ids of the subjects in ``status`` after the cursor, at most ``limit``."""
    found = []
    for subject_id in records.list_ids(root):
        if len(found) >= limit:
            break
        if (after is None or subject_id > after) and records.status_of(root, subject_id)[0] == status:
            found.append(subject_id)
    return found


def require_ready(root: str, subject_id: str) -> None:
    """For generation: SubjectNotFound (404) when absent, a 409 naming the status when not ready."""
    status, _ = records.status_of(root, subject_id)
    if status == "missing":
        raise SubjectNotFound(f"subject {subject_id!r} not found")
    if status != "ready":
        raise NotReady(f"subject {subject_id!r} is {status}, not ready: images can be made once it is ready")


class NotReady(SubjectConflict):
    """409: the subject exists but cannot generate yet (or ever: failed, canceled)."""

    def __init__(self, message: str):
        super().__init__("subject_id", message)


# --------------------------------------------------------------------------------------------
# Creating


def finetune_config(args: AppArgs, token: str | None, steps: int | None, method: str | None,
                    rank: int | None) -> FinetuneConfig:
    """The service's fine-tune defaults with the few settings a client may choose, within bounds."""
    if steps is not None and steps > args.max_train_steps:
        raise FieldError("steps", f"steps must be at most {args.max_train_steps} on this service")
    if rank is not None and rank > args.max_lora_rank:
        raise FieldError("rank", f"rank must be at most {args.max_lora_rank} on this service")
    if method is not None and method not in args.train_methods:
        raise FieldError("method", f"method must be one of {args.train_methods} on this service")
    values = dict(args.finetune_defaults)
    values.update({k: v for k, v in {"token": token, "steps": steps, "method": method, "rank": rank}.items()
                   if v is not None})
    if steps is not None:  # checkpoints and G follow the run's length
        for name in ("checkpoint_steps", "checkpoint_every", "guidance_step"):
            values.pop(name, None)
    try:
        return from_dict(FinetuneConfig, values)
    except ValueError as exc:
        raise FieldError(str(exc).split(" ", 1)[0] if str(exc).split(" ", 1)[0] in ("steps", "rank") else "body",
                         str(exc)) from exc


def upload_limits(args: AppArgs) -> uploads.UploadLimits:
    return uploads.UploadLimits(max_files=args.upload_max_files, max_file_bytes=args.upload_max_file_bytes,
                                max_total_bytes=args.upload_max_total_bytes, max_pixels=args.upload_max_pixels,
                                min_side=args.upload_min_side)


def net_policy(args: AppArgs, allow_hosts: list[str]) -> netguard.NetPolicy:
    return netguard.NetPolicy(allow_hosts=tuple(allow_hosts), allow_private=args.allow_private_urls,
                              allow_loopback=args.allow_private_urls, require_https=not args.allow_private_urls)


def check_webhook_url(args: AppArgs, url: str | None) -> None:
    """A webhook URL the scheduler will be able to sign for and reach (FieldError otherwise)."""
    if url is None:
        return
    try:
        secret = webhooks.load_secret(args.webhook_secret_env, args.webhook_secret_file)
    except ValueError:
        secret = None  # logged where the scheduler loads it; to the client: webhooks are off
    if secret is None:
        raise FieldError("webhook_url", "webhooks are off on this service (no signing secret is configured)")
    try:
        netguard.check_outbound_url(url, net_policy(args, args.webhook_allow_hosts),
                                    need_allow_list=bool(args.webhook_allow_hosts))  # an allow-list, when given, binds
    except ValueError as exc:
        raise FieldError("webhook_url", f"webhook_url is refused: {exc}") from exc


def upload_error(exc: uploads.UploadError) -> JSONResponse:
    """413 for size rules, 422 for the rest; the body names the file and the rule."""
    status = 413 if exc.rule in ("file_bytes", "total_bytes") else 422
    return JSONResponse(status_code=status, content={"detail": str(exc), "file": exc.filename, "rule": exc.rule}
                        if status == 413 else {"detail": [{"loc": ["body", "images"], "msg": str(exc),
                                                           "type": f"upload.{exc.rule}"}]})


class BodyTooLarge(Exception):
    """The streamed upload passed its byte limit (raised from ``receive``, caught by the route)."""


def counting_receive(request: Request, limit: int):
    """Wrap the request's receive so reading stops with BodyTooLarge past ``limit`` bytes."""
    receive, seen = request.receive, [0]

    async def counted():
        message = await receive()
        if message["type"] == "http.request":
            seen[0] += len(message.get("body", b""))
            if seen[0] > limit:
                raise BodyTooLarge()
        return message

    request._receive = counted  # starlette reads the body through this
    return request


async def read_multipart(request: Request, args: AppArgs) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """The form's text fields and its ``images`` files (spooled to disk past 1 MiB by starlette)."""
    form = await request.form(max_files=args.upload_max_files + 1, max_fields=32, max_part_size=4096)
    fields, files = {}, []
    for name, value in form.multi_items():
        if name == "images" and hasattr(value, "read"):
            files.append((value.filename, value))
        elif name == "images":
            raise FieldError("images", "images must be files (multipart file parts)")
        elif isinstance(value, str):
            fields[name] = value
        else:
            raise FieldError(name, f"{name} must be a text field")
    return fields, files


def validate_files(files: list[tuple[str, Any]], limits: uploads.UploadLimits) -> tuple[list, str]:
    """Every file checked (nothing stored yet, nothing kept); a loader per file that reads and
    re-encodes it again when it is stored, and the digest of the raw bytes. So the ingress holds
    one file at a time, never the whole upload (starlette spooled the files to disk)."""
    batch, digest = uploads.UploadBatch(limits, keep_images=False), hashlib.sha256()
    for filename, upload in files:
        data = _read(upload, limits, filename)
        digest.update(hashlib.sha256(data).digest())
        batch.add(filename, data)
    batch.finish()

    def loader(filename, upload):
        return lambda: uploads.validate_image(filename, _read(upload, limits, filename), limits).png

    return [loader(filename, upload) for filename, upload in files], digest.hexdigest()


def _read(upload, limits: uploads.UploadLimits, filename: str) -> bytes:
    upload.file.seek(0)
    return uploads.read_limited(upload.file, limits.max_file_bytes, filename)


def read_sources(uris: list[str], args: AppArgs) -> list[tuple[str, bytes]]:
    """The named images' bytes, each source checked before it is read (prefixes, hosts, SSRF)."""
    prefixes = tuple(args.image_source_prefixes or [args.storage_root])
    out = []
    for index, uri in enumerate(uris):
        try:
            if uri.lower().startswith(("https://", "http://")):
                data = netguard.safe_get(uri, net_policy(args, args.image_url_hosts), timeout_s=10,
                                         max_bytes=args.upload_max_file_bytes)
            else:
                data = storage.read_bytes(netguard.check_storage_source(uri, prefixes))
        except FileNotFoundError:
            raise FieldError("image_uris", f"image_uris[{index}] does not exist") from None
        except (ValueError, storage.StorageError) as exc:
            raise FieldError("image_uris", f"image_uris[{index}] is refused: {exc}") from None
        out.append((f"image_uris[{index}]", data))
    return out


def subject_record(args: AppArgs, fields: dict, config: FinetuneConfig, count: int, request: Request) -> dict:
    subject_id = fields.get("subject_id") or "s-" + secrets.token_hex(8)
    quotas = quotas_of(request)
    return records.new_record(subject_id, fields["class_noun"], config.token, to_dict(config), args.base,
                              [records.image_name(i) for i in range(count)], webhook_url=fields.get("webhook_url"),
                              retention_days=fields.get("retention_days"),
                              request_id=request_id_of(request), tenant=tenant_of(request),
                              max_concurrent=getattr(quotas, "concurrent_trainings", None))


def check_fields(fields: dict[str, str]) -> dict:
    """The multipart text fields as CreateSubjectJSON checks them (without image_uris)."""
    known = set(CreateSubjectJSON.model_fields) - {"image_uris"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise FieldError(unknown[0], f"unknown field {unknown[0]!r}; allowed: {sorted(known)}")
    try:
        body = CreateSubjectJSON.model_validate({**fields, "image_uris": ["-"]}, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "body"
        raise FieldError(name, f"{name}: {first['msg']}") from None
    return body.model_dump(exclude={"image_uris"})


def idempotency_of(request: Request, digest: str, fields: dict) -> tuple[str, str] | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise FieldError("Idempotency-Key", f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} printable "
                                            "characters")
    body = hashlib.sha256((digest + repr(sorted(fields.items()))).encode()).hexdigest()
    return key, body


async def store_images(root: str, subject_id: str, loaders: list) -> list[str]:
    """Write each image (``loaders``: callables returning its PNG), one at a time."""
    names = [records.image_name(i) for i in range(len(loaders))]
    folder = records.images_uri(root, subject_id)
    for name, load in zip(names, loaders):
        await asyncio.to_thread(lambda: storage.write_bytes(storage.join(folder, name), load()))
    return names


async def create_subject(request: Request, args: AppArgs, service: SubjectsService) -> JSONResponse:
    """Validate everything, claim the id, store the images, queue the training: 202."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    limits = upload_limits(args)
    if kind == "multipart/form-data":
        fields, files = await read_multipart(request, args)
        fields = check_fields(fields)
        sources = files
    elif kind == "application/json":
        try:
            body = CreateSubjectJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            raise FieldError(str(first["loc"][0]) if first["loc"] else "body", first["msg"]) from None
        fields = body.model_dump(exclude={"image_uris"})
        sources = await asyncio.to_thread(read_sources, body.image_uris, args)
    else:
        return JSONResponse(status_code=415, content={"detail": "send multipart/form-data (images) or "
                                                                "application/json (image_uris)"})
    check_webhook_url(args, fields.get("webhook_url"))
    config = finetune_config(args, fields.get("token"), fields.get("steps"), fields.get("method"), fields.get("rank"))
    images, digest = await asyncio.to_thread(validate_files if kind == "multipart/form-data" else validate_bytes,
                                           sources, limits)
    record = subject_record(args, fields, config, len(images), request)
    tenant, root = record["tenant"], tenant_root(args.storage_root, record["tenant"])
    view = await service.reserve(record, idempotency_of(request, digest, fields),
                                 getattr(quotas_of(request), "subjects", None))
    if not view.get("replayed"):
        try:
            names = await store_images(root, record["id"], images)
        except BaseException:  # nothing half-stored stays behind
            await service.delete(tenant, record["id"])
            raise
        view = await service.commit(tenant, record["id"], names)
    state = await asyncio.to_thread(subject_state, root, view["id"], {view["id"]: view.get("queue_position") or 0})
    state.replayed = bool(view.get("replayed"))
    return JSONResponse(status_code=202, content=state.model_dump(),
                        headers={"Location": f"{SUBJECTS_PATH}/{view['id']}"})


def validate_bytes(sources: list[tuple[str, bytes]], limits: uploads.UploadLimits) -> tuple[list[bytes], str]:
    batch, digest, pngs = uploads.UploadBatch(limits), hashlib.sha256(), []
    for name, data in sources:
        digest.update(hashlib.sha256(data).digest())
        pngs.append(batch.add(name, data).png)
    batch.finish()
    return [lambda png=png: png for png in pngs], digest.hexdigest()


def job_rows(requests: list, args: AppArgs) -> list[dict]:
    """Each request (validated ``/v1/generate`` bodies) checked against the limits, as the bulk
    job's request rows."""
    rows = []
    for index, request in enumerate(requests):
        serving.check_limits(request, args)
        if request.attention_maps:
            raise FieldError("requests", f"requests[{index}]: attention_maps is for /v1/generate only")
        settings = to_dict(serving.sampling_config(request, args))
        seed = serving.random_seed() // 2 if request.seed is None else request.seed  # room for seed + k
        for prompt in request.prompt_list:
            rows.append({"row": len(rows), "subject_id": request.subject_id, "prompt": prompt, "seed": seed,
                         "num_images": request.num_images, "settings": settings,
                         "negative_prompt": request.negative_prompt, "guidance_step": request.guidance_step,
                         "edit_step": request.edit_step})
    return rows


def job_view(root: str, job_id: str) -> JobView:
    record = async_jobs.read_job(root, job_id)
    if record is None:
        raise SubjectNotFound(f"job {job_id!r} not found")
    results = None
    if record.get("results") is not None:
        results = [JobResult(**{k: r[k] for k in ("n", "subject_id", "prompt", "seed", "status", "error")},
                             url=f"/v1/jobs/{job_id}/images/{r['n']}" if r["status"] == "succeeded" else None)
                   for r in record["results"]]
    done = record["images_total"] if record["status"] in async_jobs.JOB_FINAL else async_jobs.images_done(root, job_id)
    return JobView(id=job_id, status=record["status"], images_total=record["images_total"], images_done=done,
                   created_at=record.get("created_at"), finished_at=record.get("finished_at"),
                   error=record.get("error"), results=results)


# --------------------------------------------------------------------------------------------
# Routes


def create_schema(args: AppArgs) -> dict:
    """The create's two bodies for OpenAPI: multipart (the JSON body's fields as form fields, with
    ``images`` files) and JSON; the operator's bounds on steps, rank and method are in both."""
    json_schema = CreateSubjectJSON.model_json_schema()
    props = json_schema["properties"]
    props["steps"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": args.max_train_steps},
                                {"type": "null"}], "default": None}
    props["rank"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": args.max_lora_rank},
                               {"type": "null"}], "default": None}
    props["method"] = {"anyOf": [{"enum": list(args.train_methods)}, {"type": "null"}], "default": None}
    form = {name: {k: v for k, v in spec["anyOf"][0].items()} if "anyOf" in spec else spec
            for name, spec in props.items() if name != "image_uris"}
    form["images"] = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                      "maxItems": args.upload_max_files}
    return {
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["images", "class_noun"],
                                               "properties": form}},
            "application/json": {"schema": json_schema}}},
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                        "description": "a retried create with the same key and body returns the same subject",
                        "schema": {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX}}],
    }


SUBJECT_LINKS = {name: {"operationId": op, "parameters": {"subject_id": "$response.body#/subject_id"}}
                 for name, op in (("GetSubject", "get_subject"), ("CancelSubject", "cancel_subject"),
                                  ("DeleteSubject", "delete_subject"))}
JOB_LINKS = {"GetJob": {"operationId": "get_job", "parameters": {"job_id": "$response.body#/id"}},
             "GetJobImage": {"operationId": "get_job_image",
                             "parameters": {"job_id": "$response.body#/id", "n": 0}}}


def add_subject_routes(api: FastAPI, args: AppArgs, service: "SubjectsService | None", request_model,
                       responses, on_deleted) -> None:
    """The lifecycle routes. ``request_model``: the app's ``/v1/generate`` body model;
    ``responses(*statuses)`` builds the declared error statuses; ``on_deleted(subject_id)`` drops
    the ingress's caches of a deleted subject."""
    root = args.storage_root
    jobs_body = create_model("JobRequests", __config__=ConfigDict(extra="forbid"), __doc__=JOBS_DOC,
                             requests=(list[request_model], Field(min_length=1, max_length=args.max_job_requests)),
                             webhook_url=(str | None, Field(None, max_length=2048)))
    subject_path = Path(pattern=SUBJECT_ID_PATTERN.pattern, description="a subject id", examples=["dog"])
    job_path = Path(pattern=JOB_ID_PATTERN, description="a job id", examples=["job-0123456789abcdef"])

    def running() -> SubjectsService:
        if service is None:
            raise serving.Overloaded("the subject service is off on this deployment (subjects_service: false)")
        return service

    @api.post(SUBJECTS_PATH, status_code=202, response_model=SubjectState, operation_id="create_subject",
              summary="Create a subject from images and queue its training", openapi_extra=create_schema(args),
              responses={202: {"description": "queued", "links": SUBJECT_LINKS,
                               "headers": {"Location": {"schema": {"type": "string"}}}},
                         **responses(400, 401, 409, 413, 415, 422, 500, 503)})
    async def create(request: Request) -> Response:
        """Multipart ``images`` (PNG, JPEG, WebP) with ``class_noun`` (and optionally ``subject_id``,
        ``token``, ``webhook_url``, ``steps``, ``method``, ``rank``, ``retention_days``), or JSON with
        ``image_uris``. Every image is checked before anything is stored; 202 with the queued subject."""
        limit = args.upload_max_total_bytes + MULTIPART_OVERHEAD
        try:
            response = await create_subject(counting_receive(request, limit), args, running())
            if response.status_code == 202:
                audit_event(request, "subject.create", json.loads(response.body)["subject_id"])
            return response
        except BodyTooLarge:
            return JSONResponse(status_code=413, content={"detail": f"the upload is larger than {limit} bytes"})
        except uploads.UploadError as exc:
            return upload_error(exc)

    @api.post(SUBJECTS_PATH + "/{subject_id}/cancel", status_code=202, response_model=SubjectState,
              operation_id="cancel_subject", summary="Cancel a queued or training subject",
              responses={202: {"description": "canceled (or already final)"},
                         **responses(401, 404, 422, 500, 503)})
    async def cancel_subject(request: Request, subject_id: Annotated[str, subject_path]) -> SubjectState:
        """Stops a training within one optimizer step plus a few seconds; a final subject is unchanged."""
        tenant = tenant_of(request)
        own = tenant_root(root, tenant)
        status, _ = await asyncio.to_thread(records.status_of, own, subject_id)
        if status == "missing":
            raise SubjectNotFound(f"subject {subject_id!r} not found")
        await running().cancel(tenant, subject_id)
        audit_event(request, "subject.cancel", subject_id)
        return await asyncio.to_thread(subject_state, own, subject_id, {})

    @api.delete(SUBJECTS_PATH + "/{subject_id}", status_code=204, response_class=Response,
                operation_id="delete_subject", summary="Delete a subject and everything stored for it",
                responses={204: {"description": "deleted"}, **responses(401, 404, 422, 500, 503)})
    async def delete_subject(request: Request, subject_id: Annotated[str, subject_path]) -> Response:
        """Cancels its training, drops it from every model replica (running rows finish), erases its
        images, checkpoints, manifests, probe outputs and result rows. 404 when there is none."""
        tenant = tenant_of(request)
        removed = await running().delete(tenant, subject_id)
        on_deleted(tenant, subject_id)
        if not removed:
            raise SubjectNotFound(f"subject {subject_id!r} not found")
        audit_event(request, "subject.delete", subject_id)
        return Response(status_code=204)

    @api.post("/v1/jobs", status_code=202, response_model=JobView, operation_id="create_job",
              summary="Generate asynchronously (one /v1/generate body, or several)",
              responses={202: {"description": "queued", "links": JOB_LINKS,
                               "headers": {"Location": {"schema": {"type": "string"}}}},
                         **responses(400, 401, 404, 409, 413, 422, 500, 503)})
    async def create_job(body: request_model | jobs_body, request: Request) -> JSONResponse:
        """Runs the bulk generate job (Ray Data) on the requests; each one is checked as
        ``/v1/generate`` checks it. With ``requests``, ``webhook_url`` gets ``job.completed``."""
        several = isinstance(body, jobs_body)
        webhook_url = body.webhook_url if several else None
        check_webhook_url(args, webhook_url)
        rows = job_rows(list(body.requests) if several else [body], args)
        images = sum(r["num_images"] for r in rows)
        if images > args.max_job_images:
            raise FieldError("requests", f"a job may ask for at most {args.max_job_images} images")
        charge(request, images)
        tenant = tenant_of(request)
        own = tenant_root(root, tenant)
        for subject_id in sorted({r["subject_id"] for r in rows}):
            await asyncio.to_thread(require_ready, own, subject_id)
        record = async_jobs.new_job(async_jobs.new_job_id(), rows, webhook_url, request_id_of(request),
                                    tenant=tenant)
        await running().submit_job(record)
        audit_event(request, "job.create", record["id"], {"images": images})
        view = await asyncio.to_thread(job_view, own, record["id"])
        return JSONResponse(status_code=202, content=view.model_dump(),
                            headers={"Location": f"/v1/jobs/{record['id']}"})

    @api.get("/v1/jobs/{job_id}", response_model=JobView, operation_id="get_job", summary="A job's status",
             responses=responses(401, 404, 422, 500, 503))
    async def get_job(request: Request, job_id: Annotated[str, job_path]) -> JobView:
        return await asyncio.to_thread(job_view, tenant_root(root, tenant_of(request)), job_id)

    @api.get("/v1/jobs/{job_id}/images/{n}", response_model=None, operation_id="get_job_image",
             summary="Image n of a finished job (PNG)",
             responses={200: {"description": "the image", "content": {"image/png": {
                 "schema": {"type": "string", "format": "binary"}}}}, **responses(401, 404, 422, 500, 503)})
    async def get_job_image(request: Request, job_id: Annotated[str, job_path],
                            n: Annotated[int, Path(ge=0, le=1_000_000)]) -> Response:
        record = await asyncio.to_thread(async_jobs.read_job, tenant_root(root, tenant_of(request)), job_id)
        results = (record or {}).get("results") or []
        if n >= len(results) or results[n]["status"] != "succeeded":
            raise SubjectNotFound(f"job {job_id!r} has no image {n}")
        png = await asyncio.to_thread(storage.read_bytes, results[n]["image_uri"])
        return Response(content=png, media_type="image/png")

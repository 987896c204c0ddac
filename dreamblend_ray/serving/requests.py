"""The HTTP request layer of DreamBlend serving, independent of Ray.

Ray Serve wiring lives in ``dreamblend_ray/serving/app.py`` (and ``deployments/app.py`` re-exports
it) and the model replica's batching in ``dreamblend_ray/serving/batching.py``; this module holds
what the ingress checks before a job leaves it:

- ``AppArgs``: the typed arguments of the application builder (limits, batching, autoscaling, auth).
- ``GenerateRequest``: the pydantic body of ``POST /v1/generate``. Its sampling fields take their
  bounds and descriptions from ``config.SamplingConfig``'s declarations (``sampling_type``), seeds
  ``config.MAX_SEED`` and prompts ``config.MAX_PROMPT_CHARS``.
- ``build_job``: request + app defaults -> one ``SamplingConfig``, validated once here, and the
  ``GenerationJob`` (one prompt and one seed per image: image ``k`` uses ``seed + k``).
- Model ids for ``@serve.multiplexed``: ``"subject"``, ``"subject@g100"``, ``"subject@e400"`` or
  ``"subject@g100,e400"`` (guidance/edit checkpoint step overrides).
- API-key loading and constant-time checking.
- The exceptions the HTTP layer maps to statuses (FieldError 422, SubjectNotFound 404,
  SubjectUnusable 424, Overloaded 503, DeadlineExceeded 504).

The HTTP edge itself (routes, auth middleware, body limit, error bodies, OpenAPI, offline docs) is
``dreamblend_ray/serving/http.py`` (``make_api``).
"""

from __future__ import annotations

import hmac
import logging
import os
import random
import time
from dataclasses import fields, replace
from typing import Annotated, Any, Literal, NamedTuple, Protocol

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

from dreamblend_ray.config import (DEFAULT_TENANT, MAX_PROMPT_CHARS, MAX_SEED, SUBJECT_ID_PATTERN, TENANT_PATTERN,
                                   FieldType, SamplingConfig, Spec, field_type, spec, validate_tenant)
from dreamblend_ray.dtypes import normalize_dtype
from dreamblend_ray.observability import context
from dreamblend_ray.io import storage
from dreamblend_ray.training import layout
from dreamblend_ray.training.layout import ManifestError
from dreamblend_ray.serving import tenants
from dreamblend_ray.serving.batching import GenerationJob, GenerationResult

logger = logging.getLogger(__name__)

HEADER_PREFIX = "X-DreamBlend-"

# The SamplingConfig fields a request may set, each with the AppArgs field holding its default when
# the request leaves it out (None: SamplingConfig's own default, e.g. guidance_steps' "auto").
SAMPLING_FIELDS: dict[str, str | None] = {"num_inference_steps": "default_steps",
                                          "guidance_scale": "default_guidance_scale",
                                          "alpha": "default_alpha", "guidance_steps": None, "true_cfg_scale": None,
                                          "eta_schedule": None, "maps_start": None, "maps_stop": None}


# --------------------------------------------------------------------------------------------
# Application arguments


def _sampling_default(name: str):
    """An AppArgs field holding the default of ``SamplingConfig.<name>``: the declared default,
    bounds and help (lax like every AppArgs field: YAML "30" is 30)."""
    rule = spec(SamplingConfig, name)
    default = {f.name: f for f in fields(SamplingConfig)}[name].default
    return Field(default, ge=rule.low, le=rule.high, description=f"default {name}: {rule.help}")


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` block of deployments/serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field("embedded", description="base model: 'embedded', 'tiny', 'tiny-sd2', 'tiny-sdxl', a "
                                              "diffusers directory (SD 1.x/2.x or SDXL) or s3:// URI")
    storage_root: str = Field("./dreamblend-storage", description="root holding subjects/{id}/ (path or s3://)")
    device: str | None = Field(None, description="torch device; default CUDA when present, else CPU")
    dtype: Annotated[str | None, BeforeValidator(normalize_dtype)] = Field(
        None, description="fp32 | fp16 | bf16 (float32/float16/bfloat16 accepted); default fp32 on CPU, "
                          "bf16/fp16 on GPU")
    offload_t5: bool | None = Field(None, description="Flux/SD3: keep T5 on the CPU between encodings (it visits "
                                                      "the GPU per prompt batch); default on when the device is CUDA")
    # request limits
    max_images_per_request: int = Field(4, ge=1, le=256)
    max_prompts: int = Field(4, ge=1, le=256)
    max_inference_steps: int = Field(100, ge=1, le=spec(SamplingConfig, "num_inference_steps").high)
    max_body_bytes: int = Field(16384, ge=256, le=16 * 2**20)
    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    # defaults of the sampling settings a request may leave out
    default_steps: int = _sampling_default("num_inference_steps")
    default_guidance_scale: float = _sampling_default("guidance_scale")
    default_alpha: float = _sampling_default("alpha")
    # batching and multiplexing
    max_batch_size: int = Field(8, ge=1, le=256, description="requests per @serve.batch call")
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)
    max_models_per_replica: int = Field(4, ge=1, le=1024, description="subject pairs kept per replica (LRU)")
    batching: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: LoRA subjects' requests share sampler steps across subjects and "
                                  "join a running batch at its next denoising step; static: one sampler call "
                                  "per (subject, settings) group, run to the end (docs/serving.md)")
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
    max_ongoing_requests: int = Field(
        64, ge=1, description="per model replica; >= max_batch_size. Waiting requests queue on the replica "
                              "in arrival order for its next batch, not in Serve's router (bench_serve.py)")
    max_queued_requests: int = Field(64, ge=-1, description="per caller of the model; -1 = unbounded")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.25, ge=0)
    router_max_backoff_s: float = Field(
        0.05, gt=0, le=5, description="longest pause of Serve's router between tries to place a waiting "
                                      "request on a full replica (Ray's default, 0.5 s, starves batches)")
    health_check_period_s: float = Field(2.0, gt=0, le=60,
                                         description="how often Serve checks a model replica (a dead one is "
                                                     "replaced at the next check)")
    env_vars: dict[str, str] = Field(default_factory=dict,
                                     description="extra environment of both deployments' replicas")
    # observability (docs/operations.md "Metrics", "Request ids and logs")
    log_format: Literal["text", "json"] = Field(
        "text", description="the replicas' log lines: text, or json (one object per line: time, level, logger, "
                            "message, request_id, route, status, latency_ms, tenant)")
    metrics: bool = Field(True, description="record the dreamblend_* Prometheus metrics (off only to measure "
                                            "their cost: benchmarks/bench_serve.py --suite metrics)")
    # the subject service (docs/lifecycle.md): uploads, trainings on the cluster, webhooks, async jobs
    subjects_service: bool = Field(True, description="serve POST/DELETE /v1/subjects, cancel and /v1/jobs (a "
                                                     "scheduler actor per storage root runs the trainings)")
    max_concurrent_trainings: int = Field(2, ge=1, le=10_000, description="trainings at once; the rest queue")
    training_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs of one training task")
    training_num_gpus: float = Field(0.0, ge=0, description="Ray GPUs of one training task")
    training_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources of a training task, e.g. {training: 1} to keep "
                                          "trainings on their own worker group")
    training_max_retries: int = Field(2, ge=0, le=100, description="retries of a training whose worker died "
                                                                   "(each resumes from its last checkpoint)")
    training_torch_threads: int = Field(1, ge=1, le=1024)
    finetune_defaults: dict[str, Any] = Field(default_factory=dict,
                                              description="FinetuneConfig fields of every service training")
    max_train_steps: int = Field(2000, ge=1, le=1_000_000, description="the largest `steps` a create may ask")
    max_lora_rank: int = Field(64, ge=1, le=1024, description="the largest `rank` a create may ask")
    train_methods: list[Literal["lora", "full"]] = Field(["lora", "full"], min_length=1,
                                                         description="the `method`s a create may ask")
    upload_max_files: int = Field(20, ge=1, le=1000)
    upload_max_file_bytes: int = Field(10 * 2**20, ge=1024, le=2**30)
    upload_max_total_bytes: int = Field(50 * 2**20, ge=1024, le=16 * 2**30)
    upload_max_pixels: int = Field(16_000_000, ge=64 * 64, le=2**31)
    upload_min_side: int = Field(64, ge=1, le=65536)
    image_source_prefixes: list[str] = Field(
        default_factory=list, description="storage prefixes image_uris may name (default: the storage root only)")
    image_url_hosts: list[str] = Field(default_factory=list, description="https hosts image_uris may name")
    allow_private_urls: bool = Field(False, description="let image URLs and webhooks reach private and "
                                                        "loopback addresses (tests, private networks)")
    webhook_secret_env: str = Field("DREAMBLEND_WEBHOOK_SECRET",
                                    description="environment variable holding the whsec_ signing secret")
    webhook_secret_file: str | None = Field(None, description="file holding the signing secret")
    webhook_allow_hosts: list[str] = Field(default_factory=list)
    webhook_max_attempts: int = Field(8, ge=1, le=100)
    webhook_base_delay_s: float = Field(1.0, ge=0, le=3600)
    retention_days: int | None = Field(None, ge=1, le=36500, description="delete finished subjects this "
                                                                          "many days after they finished")
    retention_sweep_s: float = Field(3600.0, ge=1, le=7 * 86400)
    job_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs of an async job's generate actor")
    job_num_gpus: float = Field(0.0, ge=0)
    max_job_requests: int = Field(100, ge=1, le=100_000, description="request bodies in one async job (the "
                                                                     "body must also fit max_body_bytes)")
    max_job_images: int = Field(1000, ge=1, le=1_000_000, description="images one async job may ask")
    # auth and tenants (docs/operations.md)
    keys_file: str | None = Field(None, description="tenants' keys file (YAML/JSON of SHA-256 hashes, a mounted "
                                                    "secret), reloaded on change; without it the single key is "
                                                    "tenant 'default'")
    auth_failures_per_minute: int = Field(10, ge=1, le=100_000,
                                          description="401s per client address a minute before it gets 429s")
    allow_insecure: bool = Field(False, description="serve without auth on a non-loopback address (refused "
                                                    "otherwise)")
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


# --------------------------------------------------------------------------------------------
# Where the subjects are: one store for every node


RELATIVE_ROOT_HELP = ("use a remote URI (s3://, gs://, ...), or an absolute path on a mount that every node "
                      "shares (`dreamblend serve` resolves a relative --storage-root itself when it serves on one node)")


def is_relative_local(root: str) -> bool:
    """True for a local storage root given as a relative path (remote URIs and absolute paths are not)."""
    if storage.is_remote(root):
        return False
    path = root[len("file://"):] if root.startswith("file://") else root
    return not os.path.isabs(os.path.expanduser(path))


def check_storage_root(root: str, node_count: int) -> None:
    """Run where the application starts (every replica of both deployments).

    A relative local root is refused whatever the cluster: each replica would resolve it against its
    own node's working directory, so the store would silently split across nodes (or land in Ray's
    temporary directories under ``serve deploy``). An absolute local root on several nodes is
    accepted with a warning: it must be a shared mount.
    """
    if is_relative_local(root):
        raise ValueError(f"storage_root {root!r} is a relative local path, which each node would resolve "
                         f"on its own disk: {RELATIVE_ROOT_HELP}")
    if storage.is_local(root) and node_count > 1:
        logger.warning("storage_root %r is a local path on a %d-node cluster: every node must see the same "
                       "files there (a shared mount)", root, node_count)


def resolve_local_root(root: str, node_count: int, cwd: str | None = None) -> str:
    """``dreamblend serve``: a relative local root becomes absolute (against ``cwd``, default the
    current directory) when the cluster has one node; on more nodes it is refused (ValueError)."""
    if not is_relative_local(root):
        return root
    if node_count > 1:
        raise ValueError(f"--storage-root {root!r} is a relative local path and the Ray cluster has "
                         f"{node_count} nodes, whose replicas would each use their own disk: {RELATIVE_ROOT_HELP}")
    path = root[len("file://"):] if root.startswith("file://") else root
    return os.path.normpath(os.path.join(cwd or os.getcwd(), os.path.expanduser(path)))


def read_collapse_plot(root: str, subject_id: str) -> bytes:
    """A subject's attention-probe plot (PNG bytes, ``layout.collapse_plot_uri``); FileNotFoundError
    when there is none."""
    return storage.read_bytes(layout.collapse_plot_uri(root, subject_id))


def per_tenant(read, root: str):
    """``read(tenant_root, *args)`` as ``f(*args, tenant="default")``: the ingress's storage readers
    (manifest, listing, collapse plot) look only under the caller's tenant."""
    def tenant_read(*args, tenant: str = DEFAULT_TENANT):
        return read(layout.tenant_root(root, tenant), *args)

    return tenant_read


def key_source(args: AppArgs, on_reload=None):
    """The current key table (``tenants.KeyTable``) as a callable, or None with auth off: the keys
    file (reloaded when it changes) or the single key as tenant ``default``. ValueError for a
    missing or unreadable file, or a weak single key (shorter than 32 characters, a placeholder)."""
    if not args.auth_enabled:
        return None
    if args.keys_file:
        return tenants.KeyStore(args.keys_file, on_reload=on_reload).current
    key = load_api_key(args)
    tenants.check_key_strength(key)
    table = tenants.single_key_table(key)
    return lambda: table


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


def _unicode_text(value: str) -> str:
    """Text that encodes as UTF-8 (JSON's \\ud800 escapes can smuggle in lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_unicode_text)]


def _json_number(value):
    """Numbers as JSON has them: ``true`` and ``"4"`` are not numbers (pydantic's lax mode would take
    them), while ``4.0`` is a JSON Schema integer (and is taken as 4)."""
    if isinstance(value, (bool, str, bytes)):
        raise PydanticCustomError("number_type", "Input should be a JSON number")
    return value


def Int(low: int, high: int):  # noqa: N802 - a type
    """A JSON integer in [low, high] (the bounds inside the type, so they reach the schema of ``Int | None``)."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_json_number)]


def Float(low: float, high: float):  # noqa: N802 - a type
    """A finite JSON number in [low, high]."""
    return Annotated[float, Field(ge=low, le=high, allow_inf_nan=False), BeforeValidator(_json_number)]


def request_type(rule: Spec, kind: FieldType, high: float | None = None, description: str | None = None):
    """The request field type of a declared number setting: a JSON number within the declared bounds
    (``high``, an app limit, may narrow them), described by the declared help, and nullable (absent
    or null takes the app's default, or the setting's own)."""
    if kind.sequence or kind.base not in (int, float):
        raise TypeError(f"no request field type for {kind}")
    top = rule.high if high is None else high if rule.high is None else min(high, rule.high)
    number = Int(rule.low, top) if kind.base is int else Float(rule.low, top)
    return Annotated[number | None, Field(description=description or rule.help)]


def sampling_type(name: str, high: float | None = None, description: str | None = None):
    """``request_type`` of ``SamplingConfig.<name>``."""
    return request_type(spec(SamplingConfig, name), field_type(SamplingConfig, name), high, description)


NegativePrompt = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS), AfterValidator(_unicode_text)]
# A registry name (method/guidance.py's ETA_SCHEDULES, checked by SamplingConfig: a 422 naming the
# field); the registry is not read here, which would import torch to parse a body.
EtaSchedule = Annotated[str | None, StringConstraints(max_length=32, pattern=r"^[a-z][a-z0-9_]*$"),
                        Field(description=spec(SamplingConfig, "eta_schedule").help
                              + f" (default {SamplingConfig.eta_schedule})")]
REQUEST_EXAMPLE = {"subject_id": "dog", "prompt": "a sks dog on the beach", "seed": 42}


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate``. Give exactly one of ``prompt`` or ``prompts``; ``num_images``
    per prompt. Numbers must be JSON numbers: ``"4"`` and ``true`` are not 4 or 1."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [REQUEST_EXAMPLE]})

    subject_id: str = Field(pattern=SUBJECT_ID_PATTERN.pattern, description="a fine-tuned subject",
                            examples=["dog"])
    prompt: Prompt | None = Field(None, description="one prompt (or give prompts)")
    prompts: list[Prompt] | None = Field(None, min_length=1, description="several prompts (or give prompt)")
    negative_prompt: NegativePrompt | None = Field(None, description="for every image; default ''")
    num_images: Int(1, 1_000_000) = Field(1, description="images per prompt")
    seed: Int(0, MAX_SEED) | None = Field(None, description="image k uses seed + k; random if absent")
    num_inference_steps: sampling_type("num_inference_steps") = None
    guidance_scale: sampling_type("guidance_scale") = None
    true_cfg_scale: sampling_type("true_cfg_scale") = None
    alpha: sampling_type("alpha") = None
    guidance_steps: sampling_type("guidance_steps") = None
    eta_schedule: EtaSchedule = None
    guidance_step: Int(1, 1_000_000) | None = Field(None,
                                      description="override: checkpoint step of G (a saved step)")
    edit_step: Int(1, 1_000_000) | None = Field(None,
                                  description="override: checkpoint step of E (a saved step)")
    response_format: Literal["auto", "png", "json"] = Field(
        "auto", description="auto: image/png for one image, JSON with base64 PNGs otherwise; JSON always "
                            "with attention_maps")
    attention_maps: Annotated[bool, Field(strict=True)] = Field(
        False, description=spec(SamplingConfig, "attention_maps").help + "; the answer is then JSON")
    maps_start: sampling_type("maps_start") = None
    maps_stop: sampling_type("maps_stop") = None

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' or 'prompts'")
        return self

    @property
    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts)


def _one_source(given: str, json_type: str, other: str) -> dict:
    """JSON Schema: ``given`` is present and not null; ``other`` is absent or null."""
    return {"required": [given], "properties": {given: {"type": json_type}, other: {"type": "null"}}}


def request_rules(args: AppArgs) -> list[dict]:
    """The cross-field rules of a request as JSON Schema (what OpenAPI 3.1 can say of them):
    exactly one of prompt/prompts, prompts x num_images <= max_images_per_request, 'png' means one
    image, 'png' is not allowed with attention_maps, and guidance_steps/maps_stop <= default_steps
    (maps_start < default_steps) when num_inference_steps is left out. Comparisons of two given
    fields (guidance_steps or maps_stop <= num_inference_steps, maps_start < maps_stop) cannot be
    said in JSON Schema: the server answers them with a 422 naming the field."""
    rules: list[dict] = [{"oneOf": [_one_source("prompt", "string", "prompts"),
                                    _one_source("prompts", "array", "prompt")]}]
    cap = args.max_images_per_request
    for count in range(2, min(args.max_prompts, cap) + 1):
        if cap // count < cap // (count - 1):
            rules.append({"if": {"required": ["prompts"], "properties": {"prompts": {"type": "array",
                                                                                    "minItems": count}}},
                          "then": {"properties": {"num_images": {"maximum": cap // count}}}})
    rules.append({"if": {"required": ["response_format"], "properties": {"response_format": {"const": "png"}}},
                  "then": {"properties": {"num_images": {"maximum": 1}, "prompts": {"maxItems": 1}}}})
    rules.append({"if": {"required": ["attention_maps"], "properties": {"attention_maps": {"const": True}}},
                  "then": {"properties": {"response_format": {"enum": ["auto", "json"]}}}})
    rules.append({"if": {"properties": {"num_inference_steps": {"type": "null"}}},  # absent or null
                  "then": {"properties": {"guidance_steps": {"maximum": args.default_steps},
                                          "maps_stop": {"maximum": args.default_steps}}}})
    rules.append({"if": {"properties": {"num_inference_steps": {"type": "null"}, "maps_stop": {"type": "null"}}},
                  "then": {"properties": {"maps_start": {"maximum": args.default_steps - 1}}}})
    return rules


def request_model(args: AppArgs) -> type["_BaseRequest"]:
    """``GenerateRequest`` with this app's limits in its fields and schema (maximum, maxItems and
    the cross-field rules), so the OpenAPI schema states what the endpoint accepts."""
    max_prompts = min(args.max_prompts, args.max_images_per_request)
    rules = request_rules(args)

    def described(name: str, default: float) -> str:
        return f"{spec(SamplingConfig, name).help} (default {default:g})"

    def schema_extra(schema: dict) -> None:
        schema["examples"] = [REQUEST_EXAMPLE]
        schema["allOf"] = rules

    class GenerateRequest(_BaseRequest):  # named so: the OpenAPI component is "GenerateRequest"
        model_config = ConfigDict(extra="forbid", json_schema_extra=schema_extra)

        prompts: list[Prompt] | None = Field(None, min_length=1, max_length=max_prompts,
                                             description="several prompts (or give prompt)")
        num_images: Int(1, args.max_images_per_request) = Field(1, description="images per prompt")
        num_inference_steps: sampling_type("num_inference_steps", high=args.max_inference_steps,
                                           description=described("num_inference_steps", args.default_steps)) = None
        guidance_scale: sampling_type("guidance_scale",
                                      description=described("guidance_scale", args.default_guidance_scale)) = None
        true_cfg_scale: sampling_type("true_cfg_scale") = None
        alpha: sampling_type("alpha", description=described("alpha", args.default_alpha)) = None
        guidance_steps: sampling_type("guidance_steps", high=args.max_inference_steps) = None
        maps_start: sampling_type("maps_start", high=args.max_inference_steps - 1) = None
        maps_stop: sampling_type("maps_stop", high=args.max_inference_steps) = None

    return GenerateRequest


_BaseRequest = GenerateRequest


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


class SubjectUnusable(SubjectNotFound):
    """The subject's stored manifest is damaged (not JSON, or another subject's): answered 424."""


class SubjectConflict(FieldError):
    """The request conflicts with what the subject has in storage (a step that was not saved, a
    base model other than the one loaded): answered 409."""


def subject_load_error(subject_id: str, exc: ValueError) -> Exception:
    """The client-facing error for a ValueError met while loading a subject's pair: a known conflict
    (a step not saved, another base: ``layout.PairConflict``) keeps its sentence (409); anything
    else (a damaged manifest or checkpoint, whose text may name storage paths or a library) is
    logged and answered SubjectUnusable (424) with a fixed sentence."""
    if isinstance(exc, layout.PairConflict):
        return SubjectConflict("subject_id", str(exc))
    logger.error("subject %r cannot be loaded: %s", subject_id, exc)
    what = "its manifest cannot be read" if isinstance(exc, (ManifestError, UnicodeDecodeError)) else \
        "its checkpoints cannot be read"
    return SubjectUnusable(f"subject {subject_id!r} is damaged in storage ({what}); fine-tune it again")


class Overloaded(RuntimeError):
    """The model deployment cannot take the job now: answered 503 with Retry-After."""


class ReplicaUnavailable(Overloaded):
    """The model replica died with the job, and the one retry failed too or would miss the deadline
    (503 with Retry-After, like a full queue)."""


class DeadlineExceeded(TimeoutError):
    """The request ran past ``request_timeout_s``: answered 504."""


class ModelId(NamedTuple):
    tenant: str
    subject_id: str
    guidance_step: int | None
    edit_step: int | None

    @property
    def owner(self) -> tuple[str, str]:
        """(tenant, subject id): what a deletion names, and what adapters are keyed on."""
        return self.tenant, self.subject_id


def model_id_for(subject_id: str, guidance_step: int | None = None, edit_step: int | None = None,
                 tenant: str = DEFAULT_TENANT) -> str:
    """The multiplexed model id: ``subject`` or ``subject@g100``, ``subject@e400``, ``subject@g100,e400``,
    behind ``tenant~`` for a tenant other than ``default`` (so replicas cache (tenant, subject))."""
    parts = []
    if guidance_step is not None:
        parts.append(f"g{guidance_step}")
    if edit_step is not None:
        parts.append(f"e{edit_step}")
    owner = subject_id if tenant == DEFAULT_TENANT else f"{validate_tenant(tenant)}~{subject_id}"
    return owner if not parts else f"{owner}@{','.join(parts)}"


def parse_model_id(model_id: str) -> ModelId:
    """Inverse of ``model_id_for``; ValueError on anything else."""
    owner, at, overrides = model_id.partition("@")
    tenant, tilde, subject_id = owner.rpartition("~")
    tenant = tenant if tilde else DEFAULT_TENANT
    if not SUBJECT_ID_PATTERN.fullmatch(subject_id) or not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"model id {model_id!r} does not start with a valid [tenant~]subject id")
    steps: dict[str, int] = {}
    for part in filter(None, overrides.split(",")):
        if part[:1] not in ("g", "e") or not part[1:].isdigit() or part[0] in steps:
            raise ValueError(f"model id {model_id!r}: bad override {part!r} (want g<step> or e<step>)")
        steps[part[0]] = int(part[1:])
    if at and not steps:
        raise ValueError(f"model id {model_id!r} has an empty override list")
    return ModelId(tenant, subject_id, steps.get("g"), steps.get("e"))


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
    if request.response_format == "png" and request.attention_maps:
        raise FieldError("response_format", "'png' returns one image without its attention maps; use 'json' "
                                            "or 'auto' with attention_maps")
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
            raise SubjectConflict(name, f"{name} {value} is not a saved checkpoint of subject "
                                        f"{request.subject_id!r} (saved: {sorted(saved)})")
        if value == manifest.get(name):
            changes[name] = None
    return request.model_copy(update=changes) if changes else request


def sampling_config(request: GenerateRequest, args: AppArgs) -> SamplingConfig:
    """The request's SamplingConfig: its sampling fields, else the app's defaults. Built once, here,
    and passed on as is; its ValueError (e.g. guidance_steps > num_inference_steps) becomes a
    FieldError naming the field. Without ``attention_maps`` the map window is checked, then reset
    to its default: it changes nothing, so it must not split batches."""
    values: dict = {"attention_maps": request.attention_maps}
    for name, app_default in SAMPLING_FIELDS.items():
        value = getattr(request, name)
        if value is None and app_default is not None:
            value = getattr(args, app_default)
        if value is not None:
            values[name] = value
    try:
        config = SamplingConfig(**values)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise FieldError(name if name in GenerateRequest.model_fields else "body", str(exc)) from exc
    return config if config.attention_maps else replace(config, maps_start=0, maps_stop=None)


def build_job(request: GenerateRequest, args: AppArgs, seed: int, now: float | None = None,
              tenant: str = DEFAULT_TENANT) -> GenerationJob:
    """Expand a validated request into one (prompt, seed) per image; image k uses seed + k. The job
    carries the context's request id."""
    prompts = [p for p in request.prompt_list for _ in range(request.num_images)]
    seeds = [(seed + k) % (MAX_SEED + 1) for k in range(len(prompts))]
    negatives = None if request.negative_prompt is None else [request.negative_prompt] * len(prompts)
    start = time.time() if now is None else now
    return GenerationJob(model_id=model_id_for(request.subject_id, request.guidance_step, request.edit_step, tenant),
                         prompts=prompts, seeds=seeds, config=sampling_config(request, args),
                         negative_prompts=negatives, deadline=start + args.request_timeout_s,
                         request_id=context.current_request_id())


def random_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


# --------------------------------------------------------------------------------------------
# HTTP


class Backend(Protocol):
    """What the HTTP layer needs from the deployment (the Ray ingress implements it)."""

    async def generate(self, job: GenerationJob) -> GenerationResult:
        """Raises SubjectNotFound, FieldError, Overloaded or DeadlineExceeded for the client's errors."""

    async def model_health(self) -> dict:
        """Health of one model replica."""

    async def model_status(self) -> dict:
        """One model replica's batch (``DreamBlendModel.status``)."""

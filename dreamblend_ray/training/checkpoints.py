"""The subject layout, its manifest, and saving/loading a subject's checkpoint pair.

Layout under an output root (a local path or ``s3://bucket/prefix``)::

    {root}/subjects/{id}/checkpoints/step-{N}/pytorch_lora_weights.safetensors   (LoRA runs)
    {root}/subjects/{id}/checkpoints/step-{N}/unet.safetensors                   (full fine-tunes)
    {root}/subjects/{id}/subject.json        (the manifest, written LAST)
    {root}/class_images/{base_config_sha256[:12]}/{class_noun}/NNNN.png   (prior-preservation cache)

A manifest's presence means every checkpoint it lists was written: ``finetune_subject`` removes
any old manifest before it writes a checkpoint and writes the new one after the last.

LoRA checkpoints are in diffusers' format: the keys ``StableDiffusionLoraLoaderMixin.save_lora_weights``
writes (``unet.``-prefixed, ``lora.down``/``lora.up``), plus the peft ``LoraConfig`` in the
safetensors metadata under ``lora_adapter_metadata`` (so an alpha other than the rank survives),
so ``StableDiffusionPipeline.load_lora_weights(checkpoint_dir)`` loads them unchanged.
Everything is safetensors; nothing from storage is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from dreamblend_ray.io import storage
from dreamblend_ray.config import validate_subject_id

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_NAME = "subject.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FULL_WEIGHT_NAME = "unet.safetensors"
WEIGHT_NAMES = {"lora": LORA_WEIGHT_NAME, "full": FULL_WEIGHT_NAME}
LORA_PREFIX = "unet"  # StableDiffusionLoraLoaderMixin.unet_name
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- layout

def subject_uri(root: str, subject_id: str) -> str:
    return storage.join(root, "subjects", validate_subject_id(subject_id))


def checkpoint_uri(root: str, subject_id: str, step: int) -> str:
    """The directory of one checkpoint (what ``pipe.load_lora_weights`` takes)."""
    return storage.join(subject_uri(root, subject_id), "checkpoints", f"step-{int(step)}")


def manifest_uri(root: str, subject_id: str) -> str:
    return storage.join(subject_uri(root, subject_id), MANIFEST_NAME)


def weight_uri(root: str, subject_id: str, step: int, kind: str) -> str:
    return storage.join(checkpoint_uri(root, subject_id, step), WEIGHT_NAMES[kind])


def class_images_uri(root: str, config_sha256: str, class_dir: str) -> str:
    return storage.join(root, "class_images", config_sha256[:12], class_dir)


# --------------------------------------------------------------------------- safetensors I/O

def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(cpu, metadata={"format": "pt", **(metadata or {})})


def decode_safetensors(data: bytes, uri: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the string metadata of a safetensors blob."""
    from safetensors.torch import load

    try:
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        return load(data), metadata
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"{uri} is not a valid safetensors file: {exc}") from exc


def _json_safe(value: Any) -> Any:
    """peft config values made JSON-ready and deterministic (sets become sorted lists)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, str):
        return str(value)  # str-Enums (PeftType) become plain strings
    return value


def lora_checkpoint_bytes(unet: UNet2DConditionModel, adapter_name: str) -> bytes:
    """One adapter of ``unet`` as diffusers' ``pytorch_lora_weights.safetensors`` bytes."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    tensors = {f"{LORA_PREFIX}.{k}": v.to(torch.float32) for k, v in state.items()}
    config = _json_safe(unet.peft_config[adapter_name].to_dict())
    packed = {f"{LORA_PREFIX}.{k}": v for k, v in config.items()}
    return encode_safetensors(tensors, {LORA_METADATA_KEY: json.dumps(packed, sort_keys=True)})


def full_checkpoint_bytes(unet: UNet2DConditionModel) -> bytes:
    return encode_safetensors(unet.state_dict())


def save_checkpoint(root: str, subject_id: str, step: int, unet: UNet2DConditionModel, kind: str,
                    adapter_name: str | None = None) -> str:
    """Write one checkpoint; returns the weight file's URI."""
    data = lora_checkpoint_bytes(unet, adapter_name) if kind == "lora" else full_checkpoint_bytes(unet)
    uri = weight_uri(root, subject_id, step, kind)
    storage.write_bytes(uri, data)
    return uri


# --------------------------------------------------------------------------- manifest

def _field_error(name: str, problem: str, value: Any) -> ValueError:
    return ValueError(f"subject manifest field {name!r} {problem}, got {value!r}")


def _require(manifest: dict, name: str, kind: type | tuple) -> Any:
    if name not in manifest:
        raise ValueError(f"subject manifest field {name!r} is missing")
    value = manifest[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise _field_error(name, f"must be of type {getattr(kind, '__name__', kind)}", value)
    return value


def validate_manifest(manifest: Any) -> dict:
    """Check a subject manifest; raise ValueError naming the first malformed field."""
    if not isinstance(manifest, dict):
        raise ValueError(f"a subject manifest must be a JSON object, got {type(manifest).__name__}")
    if _require(manifest, "version", int) != MANIFEST_VERSION:
        raise _field_error("version", f"must be {MANIFEST_VERSION}", manifest["version"])
    try:
        validate_subject_id(_require(manifest, "subject_id", str))
    except ValueError as exc:
        raise _field_error("subject_id", "must match [A-Za-z0-9_-]{1,64}", manifest["subject_id"]) from exc
    for name in ("class_noun", "token", "instance_prompt"):
        if not _require(manifest, name, str):
            raise _field_error(name, "must be non-empty", "")
    base = _require(manifest, "base", dict)
    if not isinstance(base.get("source"), str):
        raise _field_error("base.source", "must be a string", base.get("source"))
    if not isinstance(base.get("config_sha256"), str) or not SHA256_PATTERN.fullmatch(base["config_sha256"]):
        raise _field_error("base.config_sha256", "must be 64 lowercase hex digits", base.get("config_sha256"))
    if _require(manifest, "kind", str) not in WEIGHT_NAMES:
        raise _field_error("kind", f"must be one of {sorted(WEIGHT_NAMES)}", manifest["kind"])
    steps = _require(manifest, "steps", list)
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps) \
            or steps != sorted(set(steps)):
        raise _field_error("steps", "must be a non-empty increasing list of positive integers", steps)
    for name in ("guidance_step", "edit_step"):
        if _require(manifest, name, int) not in steps:
            raise _field_error(name, f"must be one of the saved steps {steps}", manifest[name])
    curve = _require(manifest, "loss_curve", list)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in curve):
        raise _field_error("loss_curve", "must be a list of numbers", curve[:5])
    for name in ("config", "timings", "library_versions"):
        _require(manifest, name, dict)
    return manifest


def write_manifest(root: str, subject_id: str, manifest: dict) -> str:
    """Validate and write ``subject.json`` (call only after every checkpoint is written)."""
    validate_manifest(manifest)
    if manifest["subject_id"] != subject_id:
        raise _field_error("subject_id", f"must equal {subject_id!r}", manifest["subject_id"])
    uri = manifest_uri(root, subject_id)
    storage.write_json(uri, manifest)
    return uri


class ManifestError(ValueError):
    """A subject's stored manifest is damaged: not UTF-8 JSON, malformed, or another subject's.
    The message names the URI (for logs and the CLI; the HTTP layer answers without it)."""


def read_manifest(root: str, subject_id: str) -> dict:
    """The validated manifest; FileNotFoundError if the subject has none (absent or incomplete),
    ManifestError if it is damaged."""
    uri = manifest_uri(root, subject_id)
    try:
        manifest = json.loads(storage.read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{uri} is not valid JSON: {exc}") from exc
    try:
        validate_manifest(manifest)
    except ValueError as exc:
        raise ManifestError(f"{uri}: {exc}") from exc
    if manifest["subject_id"] != subject_id:
        raise ManifestError(f"{uri}: subject manifest field 'subject_id' is {manifest['subject_id']!r}, "
                            f"expected {subject_id!r}")
    return manifest


def is_complete(root: str, subject_id: str) -> bool:
    """Whether the subject has a manifest, i.e. a complete checkpoint pair."""
    return storage.exists(manifest_uri(root, subject_id))


def finetuned_with(root: str, subject_id: str, config) -> bool:
    """Whether the subject is complete and its manifest records exactly ``config`` (a FinetuneConfig)."""
    from dreamblend_ray.config import to_dict

    return is_complete(root, subject_id) and read_manifest(root, subject_id).get("config") == to_dict(config)


# --------------------------------------------------------------------------- loading a pair

def empty_unet_like(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A UNet of ``unet``'s architecture with parameters on the meta device (to be assigned)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return UNet2DConditionModel.from_config(unet.config)


def base_unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The plain (adapter-free) weights of ``unet``, even when peft layers wrap it."""
    return {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if ".lora_" not in k}


def unet_from_state(template: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """A new UNet with ``template``'s config and device/dtype holding ``state`` (strictly)."""
    unet = empty_unet_like(template)
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"UNet weights do not match the base model's architecture: {exc}") from exc
    return unet.to(device=template.device, dtype=template.dtype).eval().requires_grad_(False)


def _resolve_steps(manifest: dict, guidance_step: int | None, edit_step: int | None) -> tuple[int, int]:
    g = manifest["guidance_step"] if guidance_step is None else guidance_step
    e = manifest["edit_step"] if edit_step is None else edit_step
    for name, step in (("guidance_step", g), ("edit_step", e)):
        if step not in manifest["steps"]:
            raise ValueError(f"{name} {step!r} is not a saved checkpoint of subject "
                             f"{manifest['subject_id']!r} (saved: {manifest['steps']})")
    return g, e


def _check_base(manifest: dict, components) -> None:
    from dreamblend_ray.models.components import model_identity

    have = model_identity(components)["config_sha256"]
    want = manifest["base"]["config_sha256"]
    if have != want:  # bases named without their paths: this message reaches HTTP clients
        raise ValueError(f"subject {manifest['subject_id']!r} was fine-tuned from base "
                         f"{base_name(manifest['base']['source'])!r} (config {want[:12]}), not from the loaded "
                         f"base {base_name(components.source)!r} (config {have[:12]})")


def base_name(source: str) -> str:
    """A base model's name without its location: the last part of its path or URI."""
    return str(source).rstrip("/").rsplit("/", 1)[-1] or "unknown"


def _load_adapter(unet: UNet2DConditionModel, uri: str, adapter_name: str) -> None:
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        logger.debug("adapter %s already loaded; reusing it", adapter_name)
        return
    tensors, metadata = decode_safetensors(storage.read_bytes(uri), uri)
    lora_config = json.loads(metadata[LORA_METADATA_KEY]) if LORA_METADATA_KEY in metadata else None
    with warnings.catch_warnings():  # several adapters on one UNet is the design, not a mistake
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.load_lora_adapter(tensors, prefix=LORA_PREFIX, adapter_name=adapter_name, metadata=lora_config)


def load_pair(root: str, subject_id: str, components, guidance_step: int | None = None,
              edit_step: int | None = None):
    """Load a subject's G/E checkpoints for the sampler; returns ``(pair, manifest)``.

    LoRA subjects: adapters named ``f"{subject_id}--g{step}"`` and ``f"{subject_id}--e{step}"``
    are loaded onto ``components.unet`` (reused when already loaded) and an ``AdapterPair`` is
    returned; when G and E are the same step one adapter serves both (``pair.identical``).
    Full fine-tunes: a ``TwoUNetPair`` of new UNets (one object when G = E). Steps default to the
    manifest's ``guidance_step`` / ``edit_step`` and must be saved steps. The base must be the
    model the subject was fine-tuned from (same config hash).
    """
    from dreamblend_ray.method.pair import AdapterPair, TwoUNetPair

    manifest = read_manifest(root, subject_id)
    g, e = _resolve_steps(manifest, guidance_step, edit_step)
    _check_base(manifest, components)
    meta = {key: manifest[key] for key in ("subject_id", "kind", "class_noun", "token", "instance_prompt")}
    meta.update(guidance_step=g, edit_step=e)
    if manifest["kind"] == "full":
        def load(step):
            uri = weight_uri(root, subject_id, step, "full")
            return unet_from_state(components.unet, decode_safetensors(storage.read_bytes(uri), uri)[0])

        g_unet = load(g)
        return TwoUNetPair(g_unet, g_unet if e == g else load(e), meta=meta), manifest
    unet = components.unet
    g_name = f"{subject_id}--g{g}"
    e_name = g_name if e == g else f"{subject_id}--e{e}"
    for name, step in ((g_name, g), (e_name, e)):
        _load_adapter(unet, weight_uri(root, subject_id, step, "lora"), name)
    unet.requires_grad_(False)
    return AdapterPair(unet, g_name, e_name, meta=meta), manifest


def load_checkpoint_pair(components, guidance_uri: str, edit_uri: str):
    """G and E from two checkpoint directories (``.../step-N``), LoRA or full fine-tunes.

    LoRA checkpoints become adapters named after their URIs on ``components.unet``
    (an AdapterPair); full fine-tunes become UNets (a TwoUNetPair). Both must be of one kind.
    """
    from dreamblend_ray.method.pair import AdapterPair, TwoUNetPair

    kinds = [_checkpoint_kind(uri) for uri in (guidance_uri, edit_uri)]
    if kinds[0] != kinds[1]:
        raise ValueError(f"--guidance-ckpt is a {kinds[0]} checkpoint but --edit-ckpt is a {kinds[1]} one")
    meta = {"guidance_checkpoint": guidance_uri, "edit_checkpoint": edit_uri, "kind": kinds[0]}
    if kinds[0] == "full":
        def load(uri):
            weights = storage.join(uri, FULL_WEIGHT_NAME)
            return unet_from_state(components.unet, decode_safetensors(storage.read_bytes(weights), weights)[0])

        g_unet = load(guidance_uri)
        return TwoUNetPair(g_unet, g_unet if edit_uri == guidance_uri else load(edit_uri), meta=meta)
    names = [f"ckpt--{hashlib.sha256(uri.encode()).hexdigest()[:12]}" for uri in (guidance_uri, edit_uri)]
    for name, uri in zip(names, (guidance_uri, edit_uri)):
        _load_adapter(components.unet, storage.join(uri, LORA_WEIGHT_NAME), name)
    components.unet.requires_grad_(False)
    return AdapterPair(components.unet, names[0], names[1], meta=meta)


def _checkpoint_kind(uri: str) -> str:
    for kind, name in WEIGHT_NAMES.items():
        if storage.exists(storage.join(uri, name)):
            return kind
    raise FileNotFoundError(f"{uri}: no {' or '.join(WEIGHT_NAMES.values())} (is it a checkpoint directory?)")


def unload_pair(pair, components) -> None:
    """Free what ``load_pair`` loaded: delete the pair's adapters from ``components.unet``.

    Adapters are shared by name, so unloading a pair also unloads them for any other pair of
    the same subject and steps (the Serve LRU keys pairs by subject and steps).
    Full-fine-tune pairs own their UNets; dropping the pair frees them.
    """
    from dreamblend_ray.method.pair import AdapterPair

    if not isinstance(pair, AdapterPair):
        return
    remove_adapters(components.unet, [pair.guidance_adapter, pair.edit_adapter])


def remove_adapters(unet: UNet2DConditionModel, names: list[str]) -> None:
    """Delete the named adapters; once none is left, unwrap the peft layers entirely so the
    UNet is structurally the base model again (same modules, same state-dict keys)."""
    loaded = set(getattr(unet, "peft_config", None) or {})
    names = [n for n in dict.fromkeys(names) if n in loaded]
    if names:
        unet.delete_adapters(names)
    if not getattr(unet, "peft_config", None):
        unet.unload_lora()

"""A subject's checkpoint weights: writing them, and loading G/E pairs onto a UNet.

Where the files live and the manifest's schema are ``dreamblend_ray.training.layout``.
LoRA checkpoints are in diffusers' format: the keys ``StableDiffusionLoraLoaderMixin.save_lora_weights``
writes (``unet.``-prefixed, ``lora.down``/``lora.up``), plus the peft ``LoraConfig`` in the
safetensors metadata under ``lora_adapter_metadata`` (so an alpha other than the rank survives),
so ``StableDiffusionPipeline.load_lora_weights(checkpoint_dir)`` (SD 1.x/2.x subjects) and
``StableDiffusionXLPipeline.load_lora_weights(checkpoint_dir)`` (SDXL subjects; its loader reads the
same ``unet.`` keys) load them unchanged.
Everything is safetensors; nothing from storage is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from dreamblend_ray.io import storage
from dreamblend_ray.method.pair import AdapterPair, TwoUNetPair
from dreamblend_ray.models.components import model_identity
from dreamblend_ray.training import layout

logger = logging.getLogger(__name__)

LORA_PREFIX = "unet"  # StableDiffusionLoraLoaderMixin.unet_name
TRANSFORMER_LORA_PREFIX = "transformer"  # FluxLoraLoaderMixin / SD3LoraLoaderMixin.transformer_name
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


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


def lora_prefix(model) -> str:
    """The key prefix of a denoiser's LoRA file: ``unet`` (SD, SDXL) or ``transformer`` (Flux, SD3)."""
    return LORA_PREFIX if isinstance(model, UNet2DConditionModel) else TRANSFORMER_LORA_PREFIX


def lora_checkpoint_bytes(unet: UNet2DConditionModel, adapter_name: str) -> bytes:
    """One adapter of ``unet`` as diffusers' ``pytorch_lora_weights.safetensors`` bytes (a
    transformer's in peft's key names, as ``FluxLoraLoaderMixin.save_lora_weights`` writes them)."""
    prefix = lora_prefix(unet)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if prefix == LORA_PREFIX:
        state = convert_state_dict_to_diffusers(state)
    tensors = {f"{prefix}.{k}": v.to(torch.float32) for k, v in state.items()}
    config = _json_safe(unet.peft_config[adapter_name].to_dict())
    packed = {f"{prefix}.{k}": v for k, v in config.items()}
    return encode_safetensors(tensors, {LORA_METADATA_KEY: json.dumps(packed, sort_keys=True)})


def full_checkpoint_bytes(unet: UNet2DConditionModel) -> bytes:
    return encode_safetensors(unet.state_dict())


def save_checkpoint(root: str, subject_id: str, step: int, unet: UNet2DConditionModel, kind: str,
                    adapter_name: str | None = None) -> str:
    """Write one checkpoint; returns the weight file's URI."""
    data = lora_checkpoint_bytes(unet, adapter_name) if kind == "lora" else full_checkpoint_bytes(unet)
    uri = layout.weight_uri(root, subject_id, step, kind)
    storage.write_bytes(uri, data)
    return uri


# --------------------------------------------------------------------------- loading a pair

def empty_unet_like(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A denoiser of ``unet``'s class and architecture with parameters on the meta device (to be assigned)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return type(unet).from_config(unet.config)


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


def manifest_family(manifest: dict) -> str:
    """The model family a subject was fine-tuned on; manifests written before families were
    recorded are Stable Diffusion ("sd")."""
    return manifest["base"].get("family") or "sd"


def _check_base(manifest: dict, components) -> None:
    """ValueError unless ``components`` is the base the subject was fine-tuned from: first its
    model family (an SDXL subject on an SD base, say), then its config hash."""
    identity = model_identity(components)
    want_family, have_family = manifest_family(manifest), identity["family"]
    if want_family != have_family:
        raise layout.PairConflict(f"subject {manifest['subject_id']!r} was fine-tuned from base "
                         f"{layout.base_name(manifest['base']['source'])!r} of model family {want_family!r}, "
                         f"but the loaded base {layout.base_name(components.source)!r} is of family "
                         f"{have_family!r}; a subject loads only on the base it was fine-tuned from")
    have, want = identity["config_sha256"], manifest["base"]["config_sha256"]
    if have != want:  # bases named without their paths: this message reaches HTTP clients
        raise layout.PairConflict(f"subject {manifest['subject_id']!r} was fine-tuned from base "
                         f"{layout.base_name(manifest['base']['source'])!r} (config {want[:12]}), not from the loaded "
                         f"base {layout.base_name(components.source)!r} (config {have[:12]})")


def _load_adapter(unet: UNet2DConditionModel, uri: str, adapter_name: str) -> None:
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        logger.debug("adapter %s already loaded; reusing it", adapter_name)
        return
    _attach_adapter(unet, adapter_name, *decode_safetensors(storage.read_bytes(uri), uri))


def _attach_adapter(unet: UNet2DConditionModel, adapter_name: str, tensors: dict, metadata: dict) -> None:
    """Inject a decoded LoRA checkpoint as adapter ``adapter_name`` (kept if already loaded)."""
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        logger.debug("adapter %s already loaded; reusing it", adapter_name)
        return
    lora_config = json.loads(metadata[LORA_METADATA_KEY]) if LORA_METADATA_KEY in metadata else None
    with warnings.catch_warnings():  # several adapters on one UNet is the design, not a mistake
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.load_lora_adapter(tensors, prefix=lora_prefix(unet), adapter_name=adapter_name, metadata=lora_config)


@dataclass
class PairFiles:
    """What loading a subject's pair reads from storage, read before the UNet is touched.

    ``weights``: adapter name (LoRA) or step (full) -> decoded ``(tensors, metadata)``; a LoRA
    adapter already on the UNet when it was fetched is not read again. ``namespace`` (a tenant)
    prefixes the adapter names, so two tenants' subjects of one id never share an adapter.
    """

    root: str
    manifest: dict
    guidance_step: int
    edit_step: int
    meta: dict
    weights: dict = field(default_factory=dict)
    namespace: str = ""

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def adapter_names(self) -> tuple[str, str]:
        owner = f"{self.namespace}~{self.manifest['subject_id']}" if self.namespace else self.manifest["subject_id"]
        g_name = f"{owner}--g{self.guidance_step}"
        return g_name, g_name if self.edit_step == self.guidance_step else f"{owner}--e{self.edit_step}"


def fetch_pair(root: str, subject_id: str, components, guidance_step: int | None = None,
               edit_step: int | None = None, namespace: str = "") -> PairFiles:
    """Read and check a subject's G/E checkpoints without changing the UNet (storage I/O and
    decoding only, so a serving replica can do it while other requests sample). ``namespace``:
    the owner's prefix of the adapter names (``PairFiles``)."""
    manifest = layout.read_manifest(root, subject_id)
    g, e = layout.resolve_steps(manifest, guidance_step, edit_step)
    _check_base(manifest, components)
    meta = {key: manifest[key] for key in ("subject_id", "kind", "class_noun", "token", "instance_prompt")}
    meta.update(guidance_step=g, edit_step=e)
    files = PairFiles(root, manifest, g, e, meta, namespace=namespace)
    if files.kind == "full":
        for step in dict.fromkeys((g, e)):
            uri = layout.weight_uri(root, subject_id, step, "full")
            files.weights[step] = decode_safetensors(storage.read_bytes(uri), uri)
        return files
    loaded = getattr(components.denoiser, "peft_config", None) or {}
    for name, step in zip(files.adapter_names(), (g, e)):
        if name not in loaded and name not in files.weights:
            uri = layout.weight_uri(root, subject_id, step, "lora")
            files.weights[name] = decode_safetensors(storage.read_bytes(uri), uri)
    return files


def attach_pair(files: PairFiles, components):
    """The sampler's pair from fetched files: LoRA adapters injected into ``components.unet`` (the
    one step that changes the shared UNet), or new UNets for a full fine-tune."""
    if files.kind == "full":
        g_unet = unet_from_state(components.denoiser, files.weights[files.guidance_step][0])
        e_unet = g_unet if files.edit_step == files.guidance_step else \
            unet_from_state(components.denoiser, files.weights[files.edit_step][0])
        return TwoUNetPair(g_unet, e_unet, meta=files.meta)
    unet = components.denoiser
    g_name, e_name = files.adapter_names()
    for name in dict.fromkeys((g_name, e_name)):
        if name in files.weights:
            _attach_adapter(unet, name, *files.weights[name])
        elif name not in (getattr(unet, "peft_config", None) or {}):  # unloaded since the fetch
            step = files.guidance_step if name == g_name else files.edit_step
            _load_adapter(unet, layout.weight_uri(files.root, files.manifest["subject_id"], step, "lora"), name)
    unet.requires_grad_(False)
    return AdapterPair(unet, g_name, e_name, meta=files.meta)


def load_pair(root: str, subject_id: str, components, guidance_step: int | None = None,
              edit_step: int | None = None):
    """Load a subject's G/E checkpoints for the sampler; returns ``(pair, manifest)``.

    LoRA subjects: adapters named ``f"{subject_id}--g{step}"`` and ``f"{subject_id}--e{step}"``
    are loaded onto ``components.unet`` (reused when already loaded) and an ``AdapterPair`` is
    returned; when G and E are the same step one adapter serves both (``pair.identical``).
    Full fine-tunes: a ``TwoUNetPair`` of new UNets (one object when G = E). Steps default to the
    manifest's ``guidance_step`` / ``edit_step`` and must be saved steps. The base must be the
    model the subject was fine-tuned from (same config hash). :func:`fetch_pair` then
    :func:`attach_pair`.
    """
    files = fetch_pair(root, subject_id, components, guidance_step, edit_step)
    return attach_pair(files, components), files.manifest


def load_checkpoint_pair(components, guidance_uri: str, edit_uri: str):
    """G and E from two checkpoint directories (``.../step-N``), LoRA or full fine-tunes.

    LoRA checkpoints become adapters named after their URIs on ``components.unet``
    (an AdapterPair); full fine-tunes become UNets (a TwoUNetPair). Both must be of one kind.
    """
    kinds = [layout.checkpoint_kind(uri) for uri in (guidance_uri, edit_uri)]
    if kinds[0] != kinds[1]:
        raise ValueError(f"--guidance-ckpt is a {kinds[0]} checkpoint but --edit-ckpt is a {kinds[1]} one")
    meta = {"guidance_checkpoint": guidance_uri, "edit_checkpoint": edit_uri, "kind": kinds[0]}
    if kinds[0] == "full":
        def load(uri):
            weights = storage.join(uri, layout.FULL_WEIGHT_NAME)
            return unet_from_state(components.denoiser, decode_safetensors(storage.read_bytes(weights), weights)[0])

        g_unet = load(guidance_uri)
        return TwoUNetPair(g_unet, g_unet if edit_uri == guidance_uri else load(edit_uri), meta=meta)
    names = [f"ckpt--{hashlib.sha256(uri.encode()).hexdigest()[:12]}" for uri in (guidance_uri, edit_uri)]
    for name, uri in zip(names, (guidance_uri, edit_uri)):
        _load_adapter(components.denoiser, storage.join(uri, layout.LORA_WEIGHT_NAME), name)
    components.denoiser.requires_grad_(False)
    return AdapterPair(components.denoiser, names[0], names[1], meta=meta)


def unload_pair(pair, components) -> None:
    """Free what ``load_pair`` loaded: delete the pair's adapters from ``components.unet``.

    Adapters are shared by name, so unloading a pair also unloads them for any other pair of
    the same subject and steps (the Serve LRU keys pairs by subject and steps).
    Full-fine-tune pairs own their UNets; dropping the pair frees them.
    """
    if not isinstance(pair, AdapterPair):
        return
    remove_adapters(components.denoiser, [pair.guidance_adapter, pair.edit_adapter])


def remove_adapters(unet: UNet2DConditionModel, names: list[str]) -> None:
    """Delete the named adapters; once none is left, unwrap the peft layers entirely so the
    UNet is structurally the base model again (same modules, same state-dict keys)."""
    loaded = set(getattr(unet, "peft_config", None) or {})
    names = [n for n in dict.fromkeys(names) if n in loaded]
    if names:
        unet.delete_adapters(names)
    if not getattr(unet, "peft_config", None):
        unet.unload_lora()

"""Base model components in diffusers' pipeline layout, for every model family.

``load_components`` reads a directory with ``model_index.json`` (UNet, VAE, scheduler and the
family's text encoders and tokenizers), from a local path, a remote URI (s3://, gs://, ...;
downloaded once to a local cache), or one of the built-in names: ``tiny``, ``tiny-sd2`` and
``tiny-sdxl``, ``tiny-flux`` and ``tiny-sd3`` (deterministic random models built in code, for
tests; ``models/sd.py``, ``models/sdxl.py``, ``models/flux.py``, ``models/sd3.py``) and ``embedded`` (the small model trained here and shipped with the package).
The family (``models/families.py``) is detected from ``model_index.json``'s ``_class_name``.
Nothing is ever downloaded from a model hub.

Offloading: a part named in ``Components.offloaded`` stays on the CPU and visits the denoiser's
device only while it runs (:meth:`Components.visiting`). ``load_components`` offloads T5 on a GPU
by default (Flux's and SD3's T5-XXL is about 9.5 GB in bf16, used once per prompt batch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from dreamblend_ray import dtypes
from dreamblend_ray.io import storage
from dreamblend_ray.models import families, flux, sd, sd3, sdxl  # noqa: F401 - each registers its family
from dreamblend_ray.models.families import Family

logger = logging.getLogger(__name__)

BUILTIN_BASES = tuple(families.BUILTINS) + ("embedded",)


@dataclass
class Components:
    """The pieces of a base model that DreamBlend needs. ``family`` names its entry in
    ``models/families.py`` (how prompts become conditioning); SDXL and Flux add a second text
    encoder and tokenizer, SD3 a third; ``options`` holds the family's model_index.json settings.
    The denoiser is ``unet`` (SD, SDXL) or ``transformer`` (Flux, SD3; ``unet`` is then None):
    family-neutral code asks for ``denoiser``."""

    unet: UNet2DConditionModel | None
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    source: str = "in-memory"
    family: str = "sd"
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: CLIPTokenizer | None = None
    options: dict = field(default_factory=dict)
    transformer: torch.nn.Module | None = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object | None = None
    offloaded: tuple[str, ...] = ()  # parts kept on the CPU between uses (see visiting)

    @property
    def model_family(self) -> Family:
        return families.get(self.family)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or the transformer, whichever the family samples with."""
        return self.transformer if self.transformer is not None else self.unet

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [module for _, module in self.named_modules()]

    def named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        names = ("transformer" if self.transformer is not None else "unet", "vae", "text_encoder",
                 "text_encoder_2", "text_encoder_3")
        return [(name, getattr(self, name)) for name in names if getattr(self, name) is not None]

    @contextlib.contextmanager
    def visiting(self, name: str):
        """Part ``name`` on the denoiser's device for the block; an offloaded part goes back to the
        CPU afterwards (and CUDA's cache is emptied), one visit at a time across threads."""
        module = getattr(self, name)
        if name not in self.offloaded:
            yield module
            return
        with _VISITS:
            device = self.device
            module.to(device)
            try:
                yield module
            finally:
                module.to("cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return self.model_family.default_size(self)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Components":
        """Move to ``device`` (and ``dtype``). A VAE whose config asks for it (``force_upcast``,
        SDXL's VAE overflows in fp16) stays in fp32 when the rest goes to fp16. Offloaded parts take
        the dtype and stay on the CPU."""
        for name, module in self.named_modules():
            if name in self.offloaded:
                module.to(device="cpu", dtype=dtype)
            elif dtype is None:
                module.to(device)
            elif module is self.vae and dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
                module.to(device=device, dtype=torch.float32)
            else:
                module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "Components":
        for module in self.modules:
            module.eval().requires_grad_(False)
        return self


_VISITS = threading.RLock()  # an offloaded part visits the device for one user at a time


def select_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA when present, else Apple MPS, else CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def select_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it, else fp16; or the requested name (the one
    vocabulary of ``dtypes``: fp32/fp16/bf16, or float32/float16/bfloat16)."""
    if requested is not None:
        return dtypes.torch_dtype(requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# --------------------------------------------------------------------------- tiny random model

def _seeded(seed: int):
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    return generator_state


def build_tiny_components(seed: int = 0, name: str = "tiny") -> Components:
    """A deterministic random model of a built-in kind (``tiny``, ``tiny-sd2``, ``tiny-sdxl``,
    ``tiny-flux``, ``tiny-sd3``): 32x32 images, 16x16x4 latents. The same seed gives the same weights on every machine (weights
    are drawn on the CPU)."""
    if name not in families.BUILTINS:
        raise ValueError(f"built-in tiny models are {sorted(families.BUILTINS)}, got {name!r}")
    family, builder = families.BUILTINS[name]
    state = _seeded(seed)
    try:
        parts = builder(seed)
    finally:
        torch.random.set_rng_state(state)
    options = {**families.get(family).options, **parts.pop("options", {})}
    parts.setdefault("unet", None)
    return Components(**parts, source=name, family=family, options=options).eval()


def default_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.x's DDIM settings."""
    return sd.scheduler()


# --------------------------------------------------------------------------- save / load

def save_components(components: Components, directory: str | os.PathLike) -> Path:
    """Write ``components`` in its family's diffusers pipeline layout, weights as safetensors.

    model_index.json plus one folder per component, as the pipeline's ``save_pretrained`` writes
    them (no safety checker, no feature extractor); the pipeline class itself is not imported,
    since it pulls in image processors the project never uses.
    """
    family = components.model_family
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
             **family.index_extras, **{k: components.options.get(k, v) for k, v in family.options.items()}}
    for name in family.model_parts + family.text_parts:
        part = getattr(components, name)
        if isinstance(part, torch.nn.Module):
            part.save_pretrained(directory / name, safe_serialization=True)
        else:
            part.save_pretrained(directory / name)
        index[name] = [type(part).__module__.split(".")[0], type(part).__name__]
    (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return directory


def embedded_model_dir() -> Path:
    return Path(__file__).parents[1] / "embedded" / "weights"


def resolve_base(base: str) -> str:
    """Map a --base value to something ``load_components`` reads; fail with a clear message."""
    if base in BUILTIN_BASES:
        return base
    if storage.is_remote(base):
        return base
    path = Path(base).expanduser()
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"base model {base!r} is not one of {list(BUILTIN_BASES)}, a remote URI (s3://, gs://, ...), "
            "or a directory with model_index.json (a diffusers StableDiffusionPipeline or "
            "StableDiffusionXLPipeline layout)")
    return str(path)


def load_components(base: str = "embedded", device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, family: str | None = None,
                    offload_t5: bool | None = None) -> Components:
    """Load base components by name, local directory or remote URI, in eval mode, no grads.
    ``family`` overrides the one model_index.json names (for derivatives with their own class).
    ``offload_t5``: keep a flow family's T5 on the CPU between encodings (None: on a CUDA device)."""
    base = resolve_base(base)
    if base in families.BUILTINS:
        components = build_tiny_components(name=base)
    elif base == "embedded":
        directory = embedded_model_dir()
        if not (directory / "model_index.json").is_file():
            raise ValueError(f"the embedded model is missing at {directory}; train it with "
                             "`python -m dreamblend_ray.embedded.train`")
        components = _load_directory(directory, family)
        components.source = "embedded"
    elif storage.is_remote(base):
        components = _load_directory(storage.cached_download(base), family)
        components.source = base
    else:
        components = _load_directory(Path(base), family)
    target = torch.device(device) if device is not None else torch.device("cpu")
    t5 = getattr(components.model_family, "t5_encoder_part", None)
    if t5 is not None and (offload_t5 if offload_t5 is not None else target.type == "cuda"):
        components.offloaded = (t5,)
    return components.to(target, dtype).eval()


def _load_directory(directory: Path, family_name: str | None = None) -> Components:
    index = json.loads((directory / "model_index.json").read_text())
    family = families.detect(index, family_name)
    missing = [name for name in family.model_parts + family.text_parts
               if name not in index or not (directory / name).is_dir()]
    if missing:
        raise ValueError(f"{directory} lacks components {missing} in model_index.json "
                         f"(a {family.pipeline_class} needs them)")
    logger.info("loading %s base components from %s", family.name, directory)
    parts = {"unet": None, **family.load_model_parts(directory), **family.load_text_parts(directory)}
    return Components(source=str(directory), family=family.name,
                      options={k: index.get(k, v) for k, v in family.options.items()}, **parts)


def model_identity(components: Components) -> dict:
    """A stable identity of a base model: its source and a hash of its UNet/VAE/text configs."""
    import hashlib

    volatile = {"transformers_version", "name_or_path", "torch_dtype", "dtype", "architectures"}

    def clean(config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_") and k not in volatile}

    configs = {
        components.model_family.denoiser_name: clean(dict(components.denoiser.config)),
        "vae": clean(dict(components.vae.config)),
        "text_encoder": clean(components.text_encoder.config.to_dict()),
    }
    for name in ("text_encoder_2", "text_encoder_3"):
        if getattr(components, name) is not None:
            configs[name] = clean(getattr(components, name).config.to_dict())
    blob = json.dumps(configs, sort_keys=True, default=str).encode()
    return {"source": components.source, "family": components.family,
            "config_sha256": hashlib.sha256(blob).hexdigest()}

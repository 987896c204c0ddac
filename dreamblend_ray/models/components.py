"""Base model components in diffusers' StableDiffusionPipeline layout.

``load_components`` reads a directory with ``model_index.json`` (UNet, VAE, text encoder,
tokenizer, scheduler), from a local path, an ``s3://`` URI (downloaded once to a local cache),
or one of the built-in names: ``tiny`` (a deterministic random model built in code, for tests)
and ``embedded`` (the small model trained here and shipped with the package).
Nothing is ever downloaded from a model hub.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dreamblend_ray import dtypes
from dreamblend_ray.io import storage

logger = logging.getLogger(__name__)

BUILTIN_BASES = ("tiny", "embedded")
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@dataclass
class Components:
    """The pieces of a Stable Diffusion 1.x/2.x model that DreamBlend needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    source: str = "in-memory"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Components":
        for module in (self.unet, self.vae, self.text_encoder):
            if dtype is None:
                module.to(device)
            else:
                module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "Components":
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval().requires_grad_(False)
        return self


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


# --------------------------------------------------------------------------- tokenizer in code

def apply_bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    parts = list(parts)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i, pair) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, _, best = min(pairs)
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list in which every word of ``words`` is one token.

    Each word is encoded with the merges so far; while it is still split, the merge of its first
    two pieces is appended. An appended merge has the lowest priority, so it only fires where
    encoding used to stop: words that were already one token stay one token, whatever the order
    (a merge from one word can no longer split another). Single characters (with and without the
    end-of-word mark) stay in the vocabulary, so any other text still tokenizes.
    """
    chars = [chr(c) for c in range(33, 127)]
    vocab_tokens = list(SPECIAL_TOKENS) + chars + [c + "</w>" for c in chars]
    known = set(vocab_tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        parts = apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in known:
                known.add(pair[0] + pair[1])
                vocab_tokens.append(pair[0] + pair[1])
            parts = apply_bpe(parts, ranks)
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    return vocab, merges


def build_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    vocab, merges = word_bpe(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


TINY_WORDS = (
    "a photo of sks dog cat toy on the beach in snow with red blue green yellow hat wearing "
    "grass city forest background painting style".split()
)


# --------------------------------------------------------------------------- tiny random model

def _seeded(seed: int):
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    return generator_state


def build_tiny_components(seed: int = 0) -> Components:
    """A deterministic random SD model: 32x32 images, 16x16x4 latents, cross-attention at 16 and 8.

    The same seed gives the same weights on every machine (weights are drawn on the CPU).
    """
    state = _seeded(seed)
    try:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
            block_out_channels=(16, 32), norm_num_groups=16, layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )
        tokenizer = build_tokenizer(list(TINY_WORDS), max_length=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    finally:
        torch.random.set_rng_state(state)
    return Components(unet, vae, text_encoder, tokenizer, default_scheduler(), source="tiny").eval()


def default_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.x's DDIM settings."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


# --------------------------------------------------------------------------- save / load

def save_components(components: Components, directory: str | os.PathLike) -> Path:
    """Write ``components`` in diffusers' StableDiffusionPipeline layout, weights as safetensors.

    model_index.json plus one folder per component, as ``StableDiffusionPipeline.save_pretrained``
    writes them (no safety checker, no feature extractor); the pipeline class itself is not imported,
    since it pulls in image processors the project never uses.
    """
    import diffusers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
             "requires_safety_checker": False}
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
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
            f"base model {base!r} is not 'tiny', 'embedded', a remote URI (s3://, gs://, ...), or a "
            "directory with model_index.json (diffusers StableDiffusionPipeline layout)")
    return str(path)


def load_components(base: str = "embedded", device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> Components:
    """Load base components by name, local directory or s3:// URI, in eval mode, no grads."""
    base = resolve_base(base)
    if base == "tiny":
        components = build_tiny_components()
    elif base == "embedded":
        directory = embedded_model_dir()
        if not (directory / "model_index.json").is_file():
            raise ValueError(f"the embedded model is missing at {directory}; train it with "
                             "`python -m dreamblend_ray.embedded.train`")
        components = _load_directory(directory)
        components.source = "embedded"
    elif storage.is_remote(base):
        components = _load_directory(storage.cached_download(base))
        components.source = base
    else:
        components = _load_directory(Path(base))
    target = torch.device(device) if device is not None else torch.device("cpu")
    return components.to(target, dtype).eval()


def _load_directory(directory: Path) -> Components:
    index = json.loads((directory / "model_index.json").read_text())
    missing = [name for name in SUBFOLDERS if name not in index or not (directory / name).is_dir()]
    if missing:
        raise ValueError(f"{directory} lacks components {missing} in model_index.json")
    logger.info("loading base components from %s", directory)
    return Components(
        unet=UNet2DConditionModel.from_pretrained(directory / "unet", use_safetensors=True),
        vae=AutoencoderKL.from_pretrained(directory / "vae", use_safetensors=True),
        text_encoder=CLIPTextModel.from_pretrained(directory / "text_encoder", use_safetensors=True),
        tokenizer=CLIPTokenizer.from_pretrained(directory / "tokenizer"),
        scheduler=DDIMScheduler.from_config(
            DDIMScheduler.load_config(directory / "scheduler")),
        source=str(directory),
    )


def model_identity(components: Components) -> dict:
    """A stable identity of a base model: its source and a hash of its UNet/VAE/text configs."""
    import hashlib

    volatile = {"transformers_version", "name_or_path", "torch_dtype", "dtype", "architectures"}

    def clean(config: dict) -> dict:
        return {k: v for k, v in config.items() if not k.startswith("_") and k not in volatile}

    configs = {
        "unet": clean(dict(components.unet.config)),
        "vae": clean(dict(components.vae.config)),
        "text_encoder": clean(components.text_encoder.config.to_dict()),
    }
    blob = json.dumps(configs, sort_keys=True, default=str).encode()
    return {"source": components.source, "config_sha256": hashlib.sha256(blob).hexdigest()}

"""Base-model families: what differs between Stable Diffusion 1.x/2.x and SDXL, behind one seam.

A family knows its diffusers pipeline class names (how a directory's ``model_index.json`` is
recognised), which parts it loads beyond the UNet, VAE and scheduler, how prompts become text
conditioning (embeddings, pooled embeddings) and which added conditioning its UNet takes. The
sampler, fine-tuning, jobs and serving ask the family (through ``models/prompts.py`` and
``models/components.py``); none of them branches on a model version.

Families register themselves in ``FAMILIES`` (``models/sd.py``, ``models/sdxl.py``); adding one is
a new module here plus its tiny model in ``BUILTINS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

FAMILIES: dict[str, "Family"] = {}
# Built-in bases made in code: name -> (family name, builder(seed) -> parts dict).
BUILTINS: dict[str, tuple[str, Callable[[int], dict]]] = {}


@dataclass
class TextEmbedding:
    """Text conditioning of N prompts.

    embeds: ``(N, T, D)`` the UNet's ``encoder_hidden_states``.
    input_ids: ``(N, T)`` the first tokenizer's ids (the guidance's token mask is built from them).
    pooled: ``(N, P)`` pooled embeddings (SDXL's ``text_embeds``), None for families without them.
    """

    embeds: torch.Tensor
    input_ids: torch.Tensor
    pooled: torch.Tensor | None = None


class Family:
    """The interface; ``models/sd.py`` and ``models/sdxl.py`` implement it."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # model_index.json ``_class_name`` values of this family
    model_parts: tuple[str, ...] = ("unet", "vae", "scheduler")  # the denoiser first
    text_parts: tuple[str, ...] = ("text_encoder", "tokenizer")
    flow_matching: bool = False  # True: a transformer sampled by flow matching (method/flow_sampler.py)
    options: dict[str, Any] = {}  # model_index.json settings this family reads, with their defaults
    index_extras: dict[str, Any] = {}  # what its pipeline's save_pretrained also writes to model_index.json

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class written to model_index.json (and used by the equivalence tests)."""
        return self.pipeline_classes[0]

    @property
    def denoiser_name(self) -> str:
        """The pipeline component that predicts the noise or velocity (``unet`` or ``transformer``)."""
        return self.model_parts[0]

    def load_model_parts(self, directory: Path) -> dict:
        """The UNet, VAE and DDIM scheduler of a Stable Diffusion layout (transformer families override)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        return {"unet": UNet2DConditionModel.from_pretrained(directory / "unet", use_safetensors=True),
                "vae": AutoencoderKL.from_pretrained(directory / "vae", use_safetensors=True),
                "scheduler": DDIMScheduler.from_config(DDIMScheduler.load_config(directory / "scheduler"))}

    def default_size(self, components) -> int:
        """The pipeline's default image side: the denoiser's ``sample_size`` times the VAE factor."""
        return int(components.denoiser.config.sample_size) * components.vae_scale_factor

    def uses_cfg(self, components, config) -> bool:
        """Whether sampling with ``config`` (a SamplingConfig) runs an unconditional branch
        (classifier-free guidance); ValueError for a setting this family does not have."""
        if config.true_cfg_scale != 1.0:
            raise ValueError(f"true_cfg_scale is FLUX.1's; {self.name} takes its classifier-free guidance "
                             f"scale from guidance_scale (got true_cfg_scale={config.true_cfg_scale:g})")
        return config.guidance_scale > 1.0

    def cfg_scale(self, config) -> float:
        """The classifier-free guidance scale of ``config`` (when :meth:`uses_cfg`)."""
        return config.guidance_scale

    def map_tokens(self, components) -> tuple[Any, int]:
        """The tokenizer whose tokens the attention maps' text axis holds, and where they start
        (heat maps and the collapse probe group them into words)."""
        return components.tokenizer, 0

    def latent_multiple(self, components) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        levels = len(components.unet.config.block_out_channels)
        return components.vae_scale_factor * 2 ** (levels - 1)

    def load_text_parts(self, directory: Path) -> dict:
        raise NotImplementedError

    def encode(self, components, prompts: list[str]) -> TextEmbedding:
        raise NotImplementedError

    def negative(self, components, negative_prompts: list[str] | None, positive: TextEmbedding) -> TextEmbedding:
        """The unconditional branch's text conditioning (the pipeline's own rule for no negative prompt)."""
        count = positive.embeds.shape[0]
        return self.encode(components, negative_prompts or [""] * count)

    def added_conditioning(self, components, text: TextEmbedding, height: int, width: int,
                           original_size: tuple[int, int] | None = None,
                           crop_top_left: tuple[int, int] = (0, 0)) -> dict | None:
        """The UNet's ``added_cond_kwargs`` for these rows (None when the family has none)."""
        return None


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def register_builtin(name: str, family: str, builder: Callable[[int], dict]) -> None:
    BUILTINS[name] = (family, builder)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family must be one of {sorted(FAMILIES)}, got {name!r}")
    return FAMILIES[name]


def detect(index: dict, override: str | None = None) -> Family:
    """The family of a diffusers directory from its ``model_index.json`` (``_class_name``), or
    ``override``. Without ``_class_name`` the Stable Diffusion layout is assumed; a pipeline class
    no family claims is a ValueError naming it."""
    if override is not None:
        return get(override)
    class_name = index.get("_class_name") or "StableDiffusionPipeline"
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ValueError(f"model_index.json names pipeline {class_name!r}, which no model family handles "
                     f"(known: {known}); pass the family explicitly if it is a derivative of one")


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Ids padded to the tokenizer's max length and truncated, as the diffusers pipelines do."""
    return tokenizer(list(prompts), padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids

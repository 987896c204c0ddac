"""Prompts to text conditioning, with a base model's tokenizers and text encoders.

The one place text becomes UNet conditioning, for sampling (``method/sampler.py``) and fine-tuning
(``training/finetune.py``) alike. What differs between base-model families (one encoder or two,
pooled embeddings, SDXL's size conditioning, the unconditional branch) is asked of the family
(``models/families.py``); this module assembles classifier-free guidance around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dreamblend_ray.models.components import Components
from dreamblend_ray.models.families import TextEmbedding


@dataclass
class Conditioning:
    """Text conditioning of a batch: ``embeds`` rows are ``[uncond; cond]`` under CFG, else ``[cond]``.

    ``added_cond_kwargs`` carries the family's added conditioning (SDXL: pooled ``text_embeds`` and
    ``time_ids``), row-aligned with ``embeds``; SD 1.x/2.x leave it None.
    """

    embeds: torch.Tensor
    input_ids: torch.Tensor
    do_cfg: bool
    added_cond_kwargs: dict | None = None

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def cond_rows(self) -> slice:
        return slice(self.batch, 2 * self.batch) if self.do_cfg else slice(0, self.batch)

    def cond_only(self) -> "Conditioning":
        rows = self.cond_rows
        extra = None if self.added_cond_kwargs is None else {
            key: value[rows] for key, value in self.added_cond_kwargs.items()}
        return Conditioning(self.embeds[rows], self.input_ids, False, extra)


def encode_prompts(components: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds, input_ids)`` of ``prompts``: ``(N, T, D)`` in the encoder's dtype and ``(N, T)``,
    as the family's diffusers pipeline computes them."""
    text = components.model_family.encode(components, list(prompts))
    return text.embeds, text.input_ids


def text_conditioning(components: Components, prompts: list[str], height: int, width: int,
                      original_size: tuple[int, int] | None = None,
                      crop_top_left: tuple[int, int] = (0, 0)) -> Conditioning:
    """Conditioning of ``prompts`` alone (no CFG), with the family's added conditioning for an
    image of ``height x width`` (fine-tuning passes each instance image's original size and crop)."""
    family = components.model_family
    text = _on_unet(components, family.encode(components, list(prompts)))
    added = family.added_conditioning(components, text, height, width, original_size, crop_top_left)
    return Conditioning(text.embeds, text.input_ids, False, added)


def prompt_conditioning(components: Components, prompts: list[str], negative_prompts: list[str] | None,
                        do_cfg: bool, height: int | None = None, width: int | None = None) -> Conditioning:
    """The batch's text conditioning as the family's diffusers pipeline computes it: rows
    ``[uncond; cond]`` under CFG (the uncond rows from ``negative_prompts``, or the family's rule
    for none), with added conditioning for ``height x width`` (default: the model's size)."""
    family = components.model_family
    height, width = height or components.default_size, width or components.default_size
    cond = _on_unet(components, family.encode(components, list(prompts)))
    added = family.added_conditioning(components, cond, height, width)
    if not do_cfg:
        return Conditioning(cond.embeds, cond.input_ids, False, added)
    uncond = _on_unet(components, family.negative(components, negative_prompts, cond))
    extra = None
    if added is not None:
        uncond_added = family.added_conditioning(components, uncond, height, width)
        extra = {key: torch.cat([uncond_added[key], added[key]]) for key in added}
    return Conditioning(torch.cat([uncond.embeds, cond.embeds]), cond.input_ids, True, extra)


def _on_unet(components: Components, text: TextEmbedding) -> TextEmbedding:
    """Embeddings on the UNet's device and dtype (ids on its device)."""
    device, dtype = components.device, components.denoiser.dtype
    pooled = None if text.pooled is None else text.pooled.to(device=device, dtype=dtype)
    return TextEmbedding(text.embeds.to(device=device, dtype=dtype), text.input_ids.to(device), pooled)

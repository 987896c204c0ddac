"""Grow a trained embedded UNet: add transformer blocks (self- and cross-attention) at its
finest (16x16) latent level without changing what it computes.

The embedded UNet has no attention at its first down block and its last up block (``DownBlock2D``
/ ``UpBlock2D``), so attention-only LoRA cannot learn a subject's pattern there. Training a base
with attention at that level from scratch drew shapes far worse for the same hour
(docs/embedded.md); growing the trained one instead keeps everything it learnt, the way
ControlNet adds zero-initialised layers to a trained model:

- the grown model is an ordinary ``UNet2DConditionModel`` whose config names
  ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` at that level, so it saves and loads with
  ``save_pretrained`` / ``from_pretrained`` and the rest of the project (attention layer
  selection, LoRA target modules) sees the new layers like any other;
- every weight of the old model is copied by name (the resnets, samplers and everything else
  keep their names in the cross-attention block types);
- each new ``Transformer2DModel``'s ``proj_out`` is zero, so it returns its input unchanged
  (``hidden + proj_out(...) = hidden + 0``) and the grown model's output equals the old one's
  exactly, bit for bit, until training moves ``proj_out``.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

PLAIN_TO_CROSS = {"DownBlock2D": "CrossAttnDownBlock2D", "UpBlock2D": "CrossAttnUpBlock2D"}


def grown_config(config: dict) -> dict:
    """The UNet config with attention at every level: plain down/up blocks become their
    cross-attention counterparts; ValueError when there is nothing to grow."""
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    if not any(name in PLAIN_TO_CROSS for name in down + up):
        raise ValueError("the UNet already has attention at every level; nothing to grow")
    unknown = [n for n in down + up if n not in PLAIN_TO_CROSS and n not in PLAIN_TO_CROSS.values()]
    if unknown:
        raise ValueError(f"cannot grow block types {unknown}; only {sorted(PLAIN_TO_CROSS)} are grown")
    grown = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    grown["down_block_types"] = tuple(PLAIN_TO_CROSS.get(n, n) for n in down)
    grown["up_block_types"] = tuple(PLAIN_TO_CROSS.get(n, n) for n in up)
    return grown


def grow_unet(unet):
    """A new UNet with transformer blocks at the levels ``unet`` lacks them, computing exactly
    what ``unet`` computes (new ``proj_out`` zero); ``unet`` itself is left untouched."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # the new blocks' other weights: seeded, though they do not matter yet
    grown = UNet2DConditionModel(**grown_config(unet.config))
    old = unet.state_dict()
    missing, unexpected = grown.load_state_dict(old, strict=False)
    if unexpected:
        raise ValueError(f"weights of the old UNet with no place in the grown one: {unexpected[:5]}")
    new_blocks = sorted({".".join(key.split(".")[:4]) for key in missing if ".attentions." in key})
    stray = [key for key in missing if ".attentions." not in key]
    if stray:
        raise ValueError(f"the grown UNet has new weights outside its new attention blocks: {stray[:5]}")
    zero_output_projections(grown, new_blocks)
    logger.info("grew the UNet: %d new transformer blocks (%s), %d new parameters",
                len(new_blocks), ", ".join(new_blocks), sum(grown.state_dict()[k].numel() for k in missing))
    return grown.to(dtype=next(unet.parameters()).dtype).eval()


@torch.no_grad()
def zero_output_projections(unet, blocks: list[str]) -> None:
    """Zero ``proj_out`` (weight and bias) of each named ``Transformer2DModel`` in ``unet``."""
    modules = dict(unet.named_modules())
    for name in blocks:
        proj_out = modules[name].proj_out
        proj_out.weight.zero_()
        if proj_out.bias is not None:
            proj_out.bias.zero_()


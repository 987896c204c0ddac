"""Prompts to text conditioning, with a base model's tokenizer and text encoder.

The one place text becomes embeddings, for sampling (``method/sampler.py``) and fine-tuning
(``training/finetune.py``) alike; a base-model family with another text stack (SDXL's two
encoders and pooled embeddings) plugs in here.
"""

from __future__ import annotations

import torch

from dreamblend_ray.models.components import Components


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's last hidden states for ``prompts`` as diffusers' StableDiffusionPipeline
    computes them (padded to the tokenizer's max length, truncated, no attention mask).

    Returns ``(embeds, input_ids)``: ``(N, T, D)`` in the encoder's dtype and ``(N, T)``, both on
    the encoder's device.
    """
    tokenizer, encoder = components.tokenizer, components.text_encoder
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(encoder.device)
    return encoder(ids)[0], ids

"""Stable Diffusion XL (and its derivatives): two text encoders, pooled embeddings, size conditioning.

As StableDiffusionXLPipeline computes them: each prompt goes through both CLIP encoders; the
penultimate hidden states of the two are concatenated (``(N, 77, 768 + 1280)`` on SDXL 1.0), the
second encoder's projected output is the pooled ``text_embeds``, and the UNet's added conditioning
is ``{"text_embeds": pooled, "time_ids": original size + crop top-left + target size}``. With no
negative prompt, the unconditional branch is zeros when the model asks for it
(``force_zeros_for_empty_prompt``, true for SDXL 1.0). Built-in tiny model: ``tiny-sdxl``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dreamblend_ray.models import sd
from dreamblend_ray.models.families import Family, TextEmbedding, register, register_builtin, tokenize
from dreamblend_ray.models.tokenizers import TINY_WORDS, build_tokenizer


class StableDiffusionXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    options = {"force_zeros_for_empty_prompt": True}
    index_extras = {"feature_extractor": [None, None], "image_encoder": [None, None]}

    def load_text_parts(self, directory: Path) -> dict:
        return {
            "text_encoder": CLIPTextModel.from_pretrained(directory / "text_encoder", use_safetensors=True),
            "tokenizer": CLIPTokenizer.from_pretrained(directory / "tokenizer"),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(directory / "text_encoder_2",
                                                                          use_safetensors=True),
            "tokenizer_2": CLIPTokenizer.from_pretrained(directory / "tokenizer_2"),
        }

    @torch.no_grad()
    def encode(self, components, prompts: list[str], max_length: int | None = None) -> TextEmbedding:
        hidden, first_ids, pooled = [], None, None
        for tokenizer, encoder in ((components.tokenizer, components.text_encoder),
                                   (components.tokenizer_2, components.text_encoder_2)):
            ids = tokenize(tokenizer, prompts, max_length).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected output of the second encoder
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
            first_ids = ids if first_ids is None else first_ids
        return TextEmbedding(torch.cat(hidden, dim=-1), first_ids, pooled)

    def negative(self, components, negative_prompts: list[str] | None, positive: TextEmbedding) -> TextEmbedding:
        if negative_prompts is None and components.options.get("force_zeros_for_empty_prompt", True):
            return TextEmbedding(torch.zeros_like(positive.embeds), positive.input_ids,
                                 torch.zeros_like(positive.pooled))
        count = positive.embeds.shape[0]
        return self.encode(components, negative_prompts or [""] * count, max_length=positive.embeds.shape[1])

    def added_conditioning(self, components, text: TextEmbedding, height: int, width: int,
                           original_size: tuple[int, int] | None = None,
                           crop_top_left: tuple[int, int] = (0, 0)) -> dict:
        time_ids = list(original_size or (height, width)) + list(crop_top_left) + [height, width]
        check_time_embedding(components.unet, len(time_ids), text.pooled.shape[-1])
        rows = text.pooled.shape[0]
        ids = torch.tensor([time_ids], dtype=text.embeds.dtype, device=text.pooled.device).repeat(rows, 1)
        return {"text_embeds": text.pooled, "time_ids": ids}


SDXL = register(StableDiffusionXL())


def check_time_embedding(unet, count: int, pooled_dim: int) -> None:
    """The UNet's added embedding must take ``count`` time ids plus the pooled text (as the
    pipeline checks): a mismatched model config fails here with the sizes named."""
    expected = unet.add_embedding.linear_1.in_features
    passed = unet.config.addition_time_embed_dim * count + pooled_dim
    if expected != passed:
        raise ValueError(f"the UNet expects an added embedding of {expected} values, but the text encoder "
                         f"and {count} time ids give {passed}; check unet.addition_time_embed_dim and "
                         "text_encoder_2.projection_dim")


def build_tiny(seed: int = 0) -> dict:
    """SDXL-shaped: no attention in the first block, transformer depth 1 then 2, ``text_time``
    added conditioning, two text encoders (the second with a projection); 32x32 images."""
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, attention_head_dim=(2, 4, 4),
        norm_num_groups=16, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    vae: AutoencoderKL = sd.tiny_vae()
    tokenizer = build_tokenizer(list(TINY_WORDS), max_length=32)
    tokenizer_2 = build_tokenizer(list(TINY_WORDS), max_length=32)
    return {"unet": unet, "vae": vae, "text_encoder": sd.tiny_text_encoder(tokenizer), "tokenizer": tokenizer,
            "text_encoder_2": sd.tiny_text_encoder(tokenizer_2, hidden_act="gelu", with_projection=True),
            "tokenizer_2": tokenizer_2, "scheduler": sd.scheduler()}


register_builtin("tiny-sdxl", "sdxl", build_tiny)

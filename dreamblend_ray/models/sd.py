"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden states, no added conditioning.

SD 2.x differs only in data the model carries: an OpenCLIP-shaped text encoder (already cut to the
layer SD 2 uses) and, for the 768 px models, a v-prediction scheduler; DDIM's step and the training
target follow ``scheduler.config.prediction_type``, so no code branches on the version.
Built-in tiny models: ``tiny`` (1.x-shaped, epsilon) and ``tiny-sd2`` (2.x-shaped, v-prediction).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dreamblend_ray.models.families import Family, TextEmbedding, register, register_builtin, tokenize
from dreamblend_ray.models.tokenizers import TINY_WORDS, build_tokenizer


class StableDiffusion(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    index_extras = {"feature_extractor": [None, None], "image_encoder": [None, None],
                    "safety_checker": [None, None], "requires_safety_checker": False}

    def load_text_parts(self, directory: Path) -> dict:
        return {"text_encoder": CLIPTextModel.from_pretrained(directory / "text_encoder", use_safetensors=True),
                "tokenizer": CLIPTokenizer.from_pretrained(directory / "tokenizer")}

    @torch.no_grad()
    def encode(self, components, prompts: list[str]) -> TextEmbedding:
        """The text encoder's last hidden states, as StableDiffusionPipeline computes them (padded
        to the tokenizer's max length, truncated, no attention mask)."""
        encoder = components.text_encoder
        ids = tokenize(components.tokenizer, prompts).to(encoder.device)
        return TextEmbedding(encoder(ids)[0], ids)


SD = register(StableDiffusion())


def scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's DDIM settings (1.x: epsilon; 2.x 768 px: v_prediction)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        block_out_channels=(16, 32), norm_num_groups=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def tiny_text_encoder(tokenizer, hidden_act: str = "quick_gelu", with_projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, projection_dim=32, hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def build_tiny(seed: int = 0) -> dict:
    """SD 1.x-shaped: 32x32 images, 16x16x4 latents, cross-attention at 16 and 8."""
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=16,
    )
    vae = tiny_vae()
    tokenizer = build_tokenizer(list(TINY_WORDS), max_length=32)
    return {"unet": unet, "vae": vae, "text_encoder": tiny_text_encoder(tokenizer), "tokenizer": tokenizer,
            "scheduler": scheduler()}


def build_tiny_sd2(seed: int = 0) -> dict:
    """SD 2.x-shaped: linear projections in the transformers, per-block head counts, a GELU
    (OpenCLIP-style) text encoder and a v-prediction scheduler."""
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=16, use_linear_projection=True,
    )
    vae = tiny_vae()
    tokenizer = build_tokenizer(list(TINY_WORDS), max_length=32)
    return {"unet": unet, "vae": vae, "text_encoder": tiny_text_encoder(tokenizer, hidden_act="gelu"),
            "tokenizer": tokenizer, "scheduler": scheduler("v_prediction")}


register_builtin("tiny", "sd", build_tiny)
register_builtin("tiny-sd2", "sd", build_tiny_sd2)

"""Stable Diffusion 3 / 3.5: an MMDiT transformer with joint blocks, sampled by flow matching with CFG.

As ``StableDiffusion3Pipeline`` computes it:
- text: the penultimate hidden states of CLIP-L and CLIP-G, concatenated on the feature axis and
  zero-padded to T5's width, then followed by T5's last hidden states on the token axis
  (``(N, 77 + 256, 4096)`` on SD3.5); pooled = CLIP-L's projection concatenated with CLIP-G's.
  No negative prompt means the empty prompt (encoded, not zeros).
- latents: the transformer patchifies itself; the VAE latent is ``(z - shift) * scale``.
- guidance: classifier-free guidance with rows ``[uncond; cond]``; the transformer takes the
  timestep (0..1000) as is. The schedule is flow-matching Euler with a fixed shift (3.0), or the
  dynamic shift when the scheduler config asks for it (``method/flow.py``).
- attention: the joint blocks' ``attn`` carries image and text tokens; SD3.5's extra image-only
  ``attn2`` (``dual_attention_layers``) is never a text-attention layer.
Built-in tiny model: ``tiny-sd3`` (SD3.5-shaped: RMS q/k norm, one dual-attention block).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from dreamblend_ray.models import sd
from dreamblend_ray.models.families import TextEmbedding, register, register_builtin, tokenize
from dreamblend_ray.models.flow_family import FlowFamily, tiny_t5, tiny_vae
from dreamblend_ray.models.tokenizers import TINY_WORDS, build_t5_tokenizer, build_tokenizer


class StableDiffusion3(FlowFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    index_extras = {"feature_extractor": [None, None], "image_encoder": [None, None]}
    max_sequence_length = 256  # StableDiffusion3Pipeline's default
    transformer_class = SD3Transformer2DModel
    t5_part = "tokenizer_3"
    t5_encoder_part = "text_encoder_3"
    # train_dreambooth_lora_sd3.py's default LoRA targets (the joint attention of both streams)
    lora_target_modules = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
    custom_sigmas = False
    max_shift_default = 1.16

    def load_text_parts(self, directory: Path) -> dict:
        parts = {}
        for suffix in ("", "_2"):
            parts["text_encoder" + suffix] = CLIPTextModelWithProjection.from_pretrained(
                directory / ("text_encoder" + suffix), use_safetensors=True)
            parts["tokenizer" + suffix] = CLIPTokenizer.from_pretrained(directory / ("tokenizer" + suffix))
        parts["text_encoder_3"] = T5EncoderModel.from_pretrained(directory / "text_encoder_3", use_safetensors=True)
        parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(directory / "tokenizer_3")
        return parts

    def text_offset(self, components) -> int:
        return int(components.tokenizer.model_max_length)

    @torch.no_grad()
    def encode(self, components, prompts: list[str]) -> TextEmbedding:
        """``embeds (N, L_clip + L_t5, D_t5)``, ``input_ids`` the CLIP-L ids then T5's (aligned with
        the text tokens), ``pooled (N, P_l + P_g)``."""
        length = int(components.tokenizer.model_max_length)
        hidden, pooled, clip_ids = [], [], None
        for tokenizer, encoder in ((components.tokenizer, components.text_encoder),
                                   (components.tokenizer_2, components.text_encoder_2)):
            ids = tokenize(tokenizer, prompts, length).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
            clip_ids = ids if clip_ids is None else clip_ids
        t5, t5_ids = self.t5_encode(components, prompts)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextEmbedding(torch.cat([clip, t5.to(clip.device)], dim=-2),
                             torch.cat([clip_ids, t5_ids.to(clip_ids.device)], dim=1), torch.cat(pooled, dim=-1))

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        return latents

    @staticmethod
    def unpack(latents: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        return latents

    def latent_channels(self, components) -> int:
        return int(components.transformer.config.in_channels)

    def latent_multiple(self, components) -> int:
        return components.vae_scale_factor * int(components.transformer.config.patch_size)

    def denoise(self, transformer, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                added: dict, guidance_scale: float, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The velocity ``(B, C, H, W)`` of ``latents`` at ``timesteps`` ``(B,)`` (0..1000)."""
        return transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                           pooled_projections=added["pooled_projections"], return_dict=False)[0]


SD3 = register(StableDiffusion3())


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3/SD3.5's scheduler config: a fixed shift of 3."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def build_tiny(seed: int = 0) -> dict:
    """SD3.5-shaped: two joint blocks (the first with SD3.5's image-only ``attn2``), RMS q/k norm,
    patch 2, CLIP-L/G of width 32 and a T5 of width 64 (the CLIP states are padded to it); 32x32
    images, 16x16x4 latents (64 image tokens), 32 CLIP + 16 T5 text tokens."""
    tokenizers = [build_tokenizer(list(TINY_WORDS), max_length=32) for _ in range(2)]
    tokenizer_3 = build_t5_tokenizer(list(TINY_WORDS), max_length=16)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    return {"transformer": transformer, "vae": tiny_vae(4, 0.0609, 1.5305),
            "text_encoder": sd.tiny_text_encoder(tokenizers[0], with_projection=True), "tokenizer": tokenizers[0],
            "text_encoder_2": sd.tiny_text_encoder(tokenizers[1], hidden_act="gelu", with_projection=True),
            "tokenizer_2": tokenizers[1], "text_encoder_3": tiny_t5(tokenizer_3, d_model=64),
            "tokenizer_3": tokenizer_3, "scheduler": scheduler()}


register_builtin("tiny-sd3", "sd3", build_tiny)

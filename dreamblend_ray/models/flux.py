"""FLUX.1: an MMDiT transformer (double- then single-stream blocks) sampled by flow matching.

As ``FluxPipeline`` computes it:
- text: CLIP's pooled output is ``pooled_projections``; T5's last hidden states (padded to
  ``max_sequence_length``, 512 for FLUX.1-dev, truncated) are the text tokens of the joint attention;
  ``txt_ids`` are zeros. The token mask is T5's: no start token, the prompt runs up to ``</s>``.
- latents: ``(B, C, H, W)`` packed into 2x2 patches ``(B, H/2 * W/2, 4C)`` around the transformer
  call, with ``img_ids`` (row, column) per patch; the VAE latent is ``(z - shift) * scale``.
- guidance: FLUX.1-dev is guidance-distilled: ``guidance_scale`` enters as the transformer's
  guidance embedding. Classifier-free guidance runs only with ``true_cfg_scale > 1`` (the
  pipeline's "true CFG"): ``neg + true_cfg_scale * (cond - neg)`` with the negative prompt's
  prediction, the guidance embedding unchanged. FluxPipeline then needs a negative prompt and
  silently skips CFG without one; here the empty prompt stands in (as SD3's rule), so
  ``true_cfg_scale`` never does nothing.
- schedule: flow-matching Euler with the shift ``mu`` computed from the image token count
  (``method/flow.py``); the transformer takes ``timestep / 1000``.
Built-in tiny model: ``tiny-flux``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from dreamblend_ray.models import sd
from dreamblend_ray.models.families import TextEmbedding, register, register_builtin, tokenize
from dreamblend_ray.models.flow_family import FlowFamily, tiny_t5, tiny_vae
from dreamblend_ray.models.tokenizers import TINY_WORDS, build_t5_tokenizer, build_tokenizer


class Flux(FlowFamily):
    name = "flux"
    transformer_class = FluxTransformer2DModel
    custom_sigmas = True  # FluxPipeline passes linspace(1, 1/n, n) sigmas
    max_shift_default = 1.15
    # train_dreambooth_lora_flux.py's default LoRA targets (attention of both streams, both MLPs)
    lora_target_modules = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                           "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                           "ff_context.net.0.proj", "ff_context.net.2")
    pipeline_classes = ("FluxPipeline",)
    text_parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    index_extras = {"feature_extractor": [None, None], "image_encoder": [None, None]}
    max_sequence_length = 512
    default_sample_size = 128  # FluxPipeline.default_sample_size

    def load_text_parts(self, directory: Path) -> dict:
        return {"text_encoder": CLIPTextModel.from_pretrained(directory / "text_encoder", use_safetensors=True),
                "tokenizer": CLIPTokenizer.from_pretrained(directory / "tokenizer"),
                "text_encoder_2": T5EncoderModel.from_pretrained(directory / "text_encoder_2", use_safetensors=True),
                "tokenizer_2": T5TokenizerFast.from_pretrained(directory / "tokenizer_2")}

    def default_size(self, components) -> int:
        """FluxPipeline's default (128 latent pixels times the VAE factor: 1024 px), or the tiny
        model's own (``options["sample_size"]``)."""
        size = int(components.options.get("sample_size", self.default_sample_size))
        return size * components.vae_scale_factor

    @torch.no_grad()
    def encode(self, components, prompts: list[str]) -> TextEmbedding:
        clip = components.text_encoder
        clip_ids = tokenize(components.tokenizer, prompts).to(clip.device)
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output
        embeds, ids = self.t5_encode(components, prompts)
        return TextEmbedding(embeds, ids, pooled)

    def negative(self, components, negative_prompts, positive: TextEmbedding) -> TextEmbedding:
        """The negative branch of true CFG: the negative prompts encoded as prompts are (the empty
        prompt for none)."""
        prompts = [""] * positive.embeds.shape[0] if negative_prompts is None else list(negative_prompts)
        return self.encode(components, prompts)

    def uses_cfg(self, components, config) -> bool:
        """Only with ``true_cfg_scale > 1``: FluxPipeline's default of 1 samples without an
        unconditional branch (FLUX.1-dev's guidance is embedded; FLUX.1-schnell has none)."""
        return config.true_cfg_scale > 1.0

    def cfg_scale(self, config) -> float:
        return config.true_cfg_scale

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``, as ``FluxPipeline._pack_latents``."""
        b, c, h, w = latents.shape
        latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(latents: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
        """``(B, H/2 * W/2, 4C)`` -> ``(B, C, H, W)``, as ``FluxPipeline._unpack_latents``."""
        b, _, channels = latents.shape
        latents = latents.view(b, latent_height // 2, latent_width // 2, channels // 4, 2, 2)
        return latents.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, latent_height, latent_width)

    def latent_channels(self, components) -> int:
        return int(components.transformer.config.in_channels) // 4

    def latent_multiple(self, components) -> int:
        """Image sides must be multiples of this (the VAE factor times the 2x2 packing)."""
        return components.vae_scale_factor * 2

    def image_seq_len(self, components, latent_height: int, latent_width: int) -> int:
        return (latent_height // 2) * (latent_width // 2)

    @staticmethod
    def image_ids(latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
        """``(H/2 * W/2, 3)`` positions (0, row, column), as ``FluxPipeline._prepare_latent_image_ids``."""
        ids = torch.zeros(latent_height // 2, latent_width // 2, 3)
        ids[..., 1] += torch.arange(latent_height // 2)[:, None]
        ids[..., 2] += torch.arange(latent_width // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def denoise(self, transformer, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                added: dict, guidance_scale, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The velocity ``(B, N, 4C)`` of packed ``latents`` at ``timesteps`` ``(B,)`` (0..1000);
        ``guidance_scale`` a float or ``(B,)`` (the guidance embedding's input)."""
        rows = latents.shape[0]
        guidance = None
        if transformer.config.guidance_embeds:  # a scale, or one per row (rows batched across requests)
            guidance = torch.as_tensor(guidance_scale, dtype=torch.float32, device=latents.device).expand(rows)
        text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype)
        image_ids = self.image_ids(*latent_hw, latents.device, embeds.dtype)
        return transformer(hidden_states=latents, timestep=timesteps.to(latents.dtype) / 1000, guidance=guidance,
                           pooled_projections=added["pooled_projections"], encoder_hidden_states=embeds,
                           txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]


FLUX = register(Flux())


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config: shift 3, dynamic shifting from the image token count."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_tiny(seed: int = 0) -> dict:
    """FLUX-shaped: one double-stream and one single-stream block, guidance embeds, rotary axes
    (2, 2, 4); 32x32 images, 16x16x4 latents (64 packed tokens), T5 length 16."""
    tokenizer = build_tokenizer(list(TINY_WORDS), max_length=32)
    tokenizer_2 = build_t5_tokenizer(list(TINY_WORDS), max_length=16)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4))
    return {"transformer": transformer, "vae": tiny_vae(4, 0.1159, 0.3611),
            "text_encoder": sd.tiny_text_encoder(tokenizer, hidden_act="gelu"), "tokenizer": tokenizer,
            "text_encoder_2": tiny_t5(tokenizer_2), "tokenizer_2": tokenizer_2, "scheduler": scheduler(),
            "options": {"sample_size": 16}}


register_builtin("tiny-flux", "flux", build_tiny)

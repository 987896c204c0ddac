"""What the flow-matching transformer families (FLUX.1 in ``models/flux.py``, SD3/SD3.5 in
``models/sd3.py``) share behind the family seam: a transformer as the denoiser, a
``FlowMatchEulerDiscreteScheduler``, T5's tokens as the text the guidance compares (no start
token), a VAE with a shift and a scale, pooled text projections; and the tiny VAE and T5 their
built-in models use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from transformers import T5Config, T5EncoderModel

from dreamblend_ray.models.families import Family, TextEmbedding, tokenize


class FlowFamily(Family):
    """What Flux and SD3 share: a transformer, a flow-matching scheduler, T5 text tokens, a VAE
    with a shift, and pooled text projections."""

    model_parts = ("transformer", "vae", "scheduler")
    flow_matching = True
    max_sequence_length = 256
    transformer_class: type = None  # the family's diffusers transformer class
    t5_part = "tokenizer_2"  # which tokenizer is T5's
    t5_encoder_part = "text_encoder_2"  # and which encoder
    lora_target_modules: tuple[str, ...] = ()  # its diffusers DreamBooth LoRA script's defaults
    custom_sigmas = True  # the pipeline passes linspace(1, 1/n, n) sigmas (FluxPipeline) or not (SD3)
    max_shift_default = 1.15  # the pipeline's max_shift when the scheduler config has none

    def load_model_parts(self, directory: Path) -> dict:
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(directory / "scheduler")
        return {"transformer": self.transformer_class.from_pretrained(directory / "transformer",
                                                                      use_safetensors=True),
                "vae": AutoencoderKL.from_pretrained(directory / "vae", use_safetensors=True),
                "scheduler": FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)}

    def sequence_length(self, components) -> int:
        """T5's padded length: the pipeline's ``max_sequence_length`` default, or the tokenizer's limit."""
        return min(self.max_sequence_length, int(getattr(components, self.t5_part).model_max_length))

    def added_conditioning(self, components, text: TextEmbedding, height: int, width: int,
                           original_size=None, crop_top_left=(0, 0)) -> dict:
        return {"pooled_projections": text.pooled}

    def map_tokens(self, components) -> tuple:
        """T5's tokens, as the guidance compares them (SD3: after the CLIP part of the sequence)."""
        return getattr(components, self.t5_part), self.text_offset(components)

    def text_offset(self, components) -> int:
        """Where T5's tokens start in the joint attention's text sequence."""
        return 0

    def token_mask(self, components, input_ids: torch.Tensor, token_indices: tuple[int, ...] = ()) -> torch.Tensor:
        """``(B, T)`` bool: T5 tokens before the first ``</s>`` (T5 has no start token; padding and
        ``</s>`` excluded). ``token_indices`` are 1-based positions within the prompt."""
        offset = self.text_offset(components)
        t5_ids = input_ids[:, offset:]
        eos = getattr(components, self.t5_part).eos_token_id
        batch, length = t5_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        first_eos = torch.where(t5_ids == eos, positions, torch.full_like(positions, length)).min(dim=1).values
        mask = positions < first_eos[:, None]
        if token_indices:
            chosen = torch.zeros(length, dtype=torch.bool, device=input_ids.device)
            chosen[[i - 1 for i in token_indices if i - 1 < length]] = True
            mask = mask & chosen
        return torch.cat([torch.zeros(batch, offset, dtype=torch.bool, device=input_ids.device), mask], dim=1)

    @staticmethod
    def to_model_latents(vae, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents to the denoiser's: ``(z - shift_factor) * scaling_factor``."""
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    @staticmethod
    def to_vae_latents(vae, latents: torch.Tensor) -> torch.Tensor:
        """The inverse: ``z / scaling_factor + shift_factor``, as the pipelines decode."""
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def image_seq_len(self, components, latent_height: int, latent_width: int) -> int:
        patch = int(components.transformer.config.patch_size)
        return (latent_height // patch) * (latent_width // patch)

    def t5_encode(self, components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5's last hidden states ``(N, L, D)`` and ids ``(N, L)``."""
        tokenizer = getattr(components, self.t5_part)
        with components.visiting(self.t5_encoder_part) as encoder:  # from the CPU when offloaded
            ids = tokenize(tokenizer, prompts, self.sequence_length(components)).to(encoder.device)
            return encoder(ids)[0], ids


def tiny_vae(latent_channels: int, shift: float, scale: float) -> AutoencoderKL:
    """A tiny VAE with FLUX's/SD3's layout: no quant convs, a latent shift and scale."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=32,
        block_out_channels=(16, 32), norm_num_groups=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale,
    )


def tiny_t5(tokenizer, d_model: int = 32) -> T5EncoderModel:
    """A two-layer T5 v1.1-shaped encoder (gated GELU) over the tiny T5 vocabulary."""
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)

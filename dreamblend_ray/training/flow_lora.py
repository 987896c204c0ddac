"""DreamBooth LoRA on flow-matching transformers (Flux, SD3), as diffusers' ``train_dreambooth_lora_flux.py``
and ``train_dreambooth_lora_sd3.py`` compute it, with checkpoints in diffusers' transformer LoRA format.

One training step of those scripts, as pure steps:

1. timesteps from a density (``weighting_scheme``: ``logit_normal`` (sigmoid of a normal), ``mode``
   (SD3 paper's mode sampling), else uniform): ``u`` -> index ``u * 1000`` into the training
   scheduler's timesteps and sigmas (the scheduler built from the base's config, not shifted
   dynamically);
2. ``noisy = (1 - sigma) * x0 + sigma * noise`` on the VAE latents ``(z - shift) * scale``;
3. the transformer's prediction (Flux: packed 2x2 patches, training guidance ``guidance_scale``
   in the guidance embedding, timestep / 1000; SD3: as is);
4. SD3 with ``precondition_outputs``: ``pred * (-sigma) + noisy`` against ``x0``; otherwise the
   velocity ``noise - x0``;
5. weighted MSE (``sigma_sqrt``: sigma^-2, ``cosmap``: 2 / (pi (1 - 2 sigma + 2 sigma^2)), else 1)
   per sample, instance rows plus ``prior_loss_weight`` times the class rows (prior preservation).

LoRA: the scripts' default target modules (``Family.lora_target_modules``), gaussian init. Files:
``FluxLoraLoaderMixin.save_lora_weights`` / ``SD3LoraLoaderMixin.save_lora_weights`` write them
(``transformer.``-prefixed keys, the peft config as metadata), so the pipelines'
``load_lora_weights`` load our checkpoints unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, SD3LoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from dreamblend_ray.models import families

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
LOADERS = {"flux": FluxLoraLoaderMixin, "sd3": SD3LoraLoaderMixin}
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class FlowLossConfig:
    """The flow-matching loss settings of diffusers' DreamBooth LoRA scripts (their defaults:
    Flux ``none``, SD3 ``logit_normal``; :meth:`for_family`)."""

    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5  # Flux's training guidance (guidance-embedding models only)
    precondition_outputs: bool = True  # SD3 only: predict x0 through the preconditioned output
    prior_loss_weight: float = 1.0

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be positive, got {self.logit_std}")
        if self.prior_loss_weight < 0 or self.guidance_scale < 0:
            raise ValueError("prior_loss_weight and guidance_scale must be >= 0")

    @classmethod
    def for_family(cls, family: str, **overrides) -> "FlowLossConfig":
        defaults = {"flux": {"weighting_scheme": "none"}, "sd3": {"weighting_scheme": "logit_normal"}}
        if family not in defaults:
            raise ValueError(f"flow-matching fine-tuning is for families {sorted(defaults)}, got {family!r}")
        return cls(**{**defaults[family], **overrides})


def training_scheduler(scheduler_config) -> FlowMatchEulerDiscreteScheduler:
    """The scripts' ``noise_scheduler_copy``: the base's scheduler at its 1000 training timesteps."""
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)


def sample_timesteps(scheduler, config: FlowLossConfig, batch: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)``, each ``(batch,)`` on the CPU, drawn from the density of
    ``config.weighting_scheme`` (with ``generator``, on its device)."""
    device = generator.device if generator is not None else "cpu"
    if config.weighting_scheme == "logit_normal":
        u = torch.normal(mean=config.logit_mean, std=config.logit_std, size=(batch,), generator=generator,
                         device=device)
        u = torch.sigmoid(u)
    elif config.weighting_scheme == "mode":
        u = torch.rand(size=(batch,), generator=generator, device=device)
        u = 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(size=(batch,), generator=generator, device=device)
    indices = (u.cpu() * scheduler.config.num_train_timesteps).long()
    return scheduler.timesteps[indices], scheduler.sigmas[indices]


@dataclass(frozen=True)
class FlowObjective:
    """What ``training/finetune.py``'s loop needs to train a flow-matching family: it stands where
    a UNet family's noise scheduler stands, and gives the per-sample losses of a micro-batch."""

    family: object
    scheduler: FlowMatchEulerDiscreteScheduler
    config: FlowLossConfig

    @classmethod
    def of(cls, components, **overrides) -> "FlowObjective":
        family = components.model_family
        return cls(family, training_scheduler(components.scheduler.config),
                   FlowLossConfig.for_family(family.name, **overrides))

    def losses(self, transformer, latents: torch.Tensor, embeds: torch.Tensor, noise_gen: torch.Generator,
               autocast, input_dtype: torch.dtype, added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """``(B,)`` float32 losses of ``latents`` (float32 model latents) with random noise and timesteps."""
        noise = torch.randn(latents.shape, generator=noise_gen, device=latents.device)
        timesteps, sigmas = sample_timesteps(self.scheduler, self.config, latents.shape[0], noise_gen)
        with autocast:
            return flow_losses(self.family, transformer, latents, noise, timesteps, sigmas, embeds,
                               added["pooled_projections"], self.config, input_dtype)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (``compute_loss_weighting_for_sd3``)."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def flow_losses(family, transformer, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                sigmas: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, config: FlowLossConfig,
                input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample weighted MSE ``(B,)`` float32: latents/noise ``(B, C, H, W)`` (model latents, after
    shift and scale), timesteps/sigmas ``(B,)``, embeds ``(B, T, D)``, pooled ``(B, P)``; the
    transformer gets its inputs in ``input_dtype`` (default: the latents')."""
    shape = (-1,) + (1,) * (latents.dim() - 1)
    sigma = sigmas.to(latents.device, latents.dtype).view(shape)
    noisy = (1.0 - sigma) * latents + sigma * noise
    latent_hw = tuple(latents.shape[-2:])
    dtype = input_dtype or latents.dtype
    pred = family.denoise(transformer, family.pack(noisy).to(dtype), timesteps.to(latents.device), embeds.to(dtype),
                          {"pooled_projections": pooled.to(dtype)}, config.guidance_scale, latent_hw)
    pred = family.unpack(pred, *latent_hw)
    if family.name == "sd3" and config.precondition_outputs:
        pred, target = pred.float() * (-sigma) + noisy, latents
    else:
        target = noise - latents
    weighting = loss_weighting(config.weighting_scheme, sigma)
    return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(latents.shape[0], -1).mean(1)


def flow_loss(family, transformer, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              sigmas: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, config: FlowLossConfig,
              num_prior: int = 0) -> torch.Tensor:
    """The scripts' loss of one batch (see :func:`flow_losses`); the last ``num_prior`` rows are
    class images (prior preservation). Returns a scalar."""
    per_sample = flow_losses(family, transformer, latents, noise, timesteps, sigmas, embeds, pooled, config)
    instance = per_sample[:latents.shape[0] - num_prior].mean()
    if num_prior == 0:
        return instance
    return instance + config.prior_loss_weight * per_sample[latents.shape[0] - num_prior:].mean()


def default_targets(transformer) -> tuple[str, ...]:
    """The LoRA targets of the family whose transformer class ``transformer`` is (its script's defaults)."""
    for family in families.FAMILIES.values():
        if getattr(family, "transformer_class", None) is type(transformer):
            return tuple(family.lora_target_modules)
    raise ValueError(f"no flow-matching family has the transformer class {type(transformer).__name__}")


def add_lora(transformer, family, rank: int, alpha: float | None, adapter_name: str,
             target_modules: tuple[str, ...] | None = None) -> list[torch.nn.Parameter]:
    """A trainable gaussian-initialised LoRA adapter on the family's default targets; its parameters."""
    targets = list(target_modules or family.lora_target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    transformer.add_adapter(config, adapter_name=adapter_name)
    transformer.set_adapter(adapter_name)
    params = [p for n, p in transformer.named_parameters() if f".{adapter_name}." in n]
    for param in params:
        param.requires_grad_(True)
    return params


def save_lora(family, transformer, adapter_name: str, directory: str | Path) -> Path:
    """Write the adapter as the family's diffusers script does (``save_lora_weights``), with its
    peft config as metadata; returns the safetensors file."""
    loader = _loader(family)
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    metadata = transformer.peft_config[adapter_name].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in metadata.items()}
    loader.save_lora_weights(str(directory), transformer_lora_layers=state, weight_name=WEIGHTS_NAME,
                             transformer_lora_adapter_metadata=metadata)
    return Path(directory) / WEIGHTS_NAME


def load_lora(family, transformer, directory: str | Path, adapter_name: str) -> None:
    """Load a checkpoint written by :func:`save_lora` (or by diffusers' script) as ``adapter_name``."""
    loader = _loader(family)
    state, metadata = loader.lora_state_dict(str(directory), weight_name=WEIGHTS_NAME, use_safetensors=True,
                                             return_lora_metadata=True)
    kwargs = {"network_alphas": None} if loader is FluxLoraLoaderMixin else {}
    loader.load_lora_into_transformer(state, transformer=transformer, adapter_name=adapter_name,
                                      metadata=metadata, **kwargs)
    transformer.requires_grad_(False)


def _loader(family):
    if family.name not in LOADERS:
        raise ValueError(f"transformer LoRA files are for families {sorted(LOADERS)}, got {family.name!r}")
    return LOADERS[family.name]

"""DDIM (eta = 0) with a timestep per row: the arithmetic of diffusers' ``DDIMScheduler.step`` on
``alphas_cumprod``, vectorised so that every sample of a batch can be at its own step.

Continuous batching (``method/rows.py``) needs this: a request that joins a running batch starts at
its first step while the others are half-way, so one ``scheduler.step(eps, t, z)`` with a single
``t`` cannot serve the batch. diffusers' scheduler stays the reference (tests/test_rows.py checks
the two agree step by step). Pure functions; the schedule's constants come in a :class:`DDIMTable`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class DDIMTable:
    """What a DDIM step reads from a scheduler config: the cumulative alphas and the options."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32, on CPU
    final_alpha_cumprod: float
    num_train_timesteps: int
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float

    @classmethod
    def of(cls, scheduler_config) -> "DDIMTable":
        """The table of a diffusers scheduler config; ValueError for what per-row DDIM does not do."""
        reference = DDIMScheduler.from_config(scheduler_config)
        config = reference.config
        if config.thresholding:
            raise ValueError("per-row DDIM does not implement dynamic thresholding (the scheduler config "
                             "sets thresholding=True); serve this base with batching='static'")
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {config.prediction_type!r}")
        return cls(reference.alphas_cumprod.float().cpu(), float(reference.final_alpha_cumprod),
                   int(config.num_train_timesteps), config.prediction_type, bool(config.clip_sample),
                   float(config.clip_sample_range))


def timesteps(scheduler_config, num_inference_steps: int) -> list[int]:
    """The timesteps diffusers' DDIMScheduler visits for ``num_inference_steps`` (its spacing rule)."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    return [int(t) for t in scheduler.timesteps]


def previous_timesteps(table: DDIMTable, t: torch.Tensor, num_inference_steps: torch.Tensor) -> torch.Tensor:
    """Each row's previous timestep, as DDIMScheduler computes it: ``t - T_train // steps``."""
    return t - torch.div(table.num_train_timesteps, num_inference_steps, rounding_mode="floor")


def alpha_at(table: DDIMTable, t: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod[t]`` per row; a negative ``t`` (past the last step) reads the final alpha."""
    index = t.clamp(min=0).cpu()
    values = table.alphas_cumprod[index]
    return torch.where(t.cpu() >= 0, values, torch.full_like(values, table.final_alpha_cumprod))


def step(table: DDIMTable, model_output: torch.Tensor, t: torch.Tensor, num_inference_steps: torch.Tensor,
         sample: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step per row: ``(B, C, H, W)`` at timesteps ``t`` (B,) -> the previous sample.

    ``num_inference_steps`` (B,) is each row's own schedule length (it sets the row's stride).
    """
    shape = (-1,) + (1,) * (sample.dim() - 1)
    alpha_t = alpha_at(table, t).to(sample.device, sample.dtype).view(shape)
    alpha_prev = alpha_at(table, previous_timesteps(table, t, num_inference_steps)).to(
        sample.device, sample.dtype).view(shape)
    beta_t = 1 - alpha_t
    x0, eps = _x0_and_eps(table.prediction_type, model_output, sample, alpha_t, beta_t)
    if table.clip_sample:
        x0 = x0.clamp(-table.clip_sample_range, table.clip_sample_range)
    return alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps


def _x0_and_eps(prediction_type: str, output, sample, alpha_t, beta_t):
    """The predicted clean sample and noise, from the model's output type."""
    if prediction_type == "epsilon":
        return (sample - beta_t ** 0.5 * output) / alpha_t ** 0.5, output
    if prediction_type == "sample":
        return output, (sample - alpha_t ** 0.5 * output) / beta_t ** 0.5
    return alpha_t ** 0.5 * sample - beta_t ** 0.5 * output, alpha_t ** 0.5 * output + beta_t ** 0.5 * sample

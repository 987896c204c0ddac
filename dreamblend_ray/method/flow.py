"""Flow-matching Euler sampling with a sigma per row: the arithmetic of diffusers'
``FlowMatchEulerDiscreteScheduler`` (deterministic, ``stochastic_sampling=False``), beside
``method/ddim.py`` for the UNet families.

A flow model predicts the velocity ``v = noise - x0`` of ``x_sigma = (1 - sigma) x0 + sigma noise``;
one Euler step from sigma to the next is ``x + (sigma_next - sigma) v``. The schedule of sigmas is
the scheduler's own (its ``set_timesteps``, with the custom sigmas and the resolution-dependent
shift ``mu`` that each pipeline passes), so the two agree to the bit; the step is vectorised over
rows so that every row of a batch can be at its own sigma (continuous batching).
tests/test_flow.py checks both against the scheduler step by step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

UNSUPPORTED = ("stochastic_sampling", "invert_sigmas")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The dynamic shift ``mu``: linear in the image token count, ``base_shift`` at
    ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` (FLUX.1; SD3.5 when configured)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


@dataclass(frozen=True)
class FlowSchedule:
    """One row's schedule: ``timesteps`` ``(n,)`` (what the model is called with, 0..1000) and
    ``sigmas`` ``(n + 1,)`` (the last one is 0)."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    mu: float | None

    def __len__(self) -> int:
        return len(self.timesteps)


def check_config(scheduler_config) -> None:
    """ValueError for the scheduler options per-row Euler does not implement."""
    for name in UNSUPPORTED:
        if scheduler_config.get(name, False):
            raise ValueError(f"flow sampling does not implement {name}=True (set in the scheduler config)")


def schedule(scheduler_config, num_inference_steps: int, image_seq_len: int,
             custom_sigmas: bool, max_shift_default: float = 1.15) -> FlowSchedule:
    """The sigmas the family's pipeline sets for ``num_inference_steps`` and ``image_seq_len`` tokens.

    custom_sigmas: the pipeline passes ``linspace(1, 1/n, n)`` (FluxPipeline) rather than letting the
    scheduler space them (StableDiffusion3Pipeline). ``mu`` is computed when the config asks for
    dynamic shifting, from its ``base/max_image_seq_len`` and ``base/max_shift``.
    """
    check_config(scheduler_config)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    config = scheduler.config
    sigmas = None
    if custom_sigmas and not config.get("use_flow_sigmas", False):
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = None
    if config.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", max_shift_default))
    scheduler.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
    return FlowSchedule(scheduler.timesteps.float().cpu(), scheduler.sigmas.float().cpu(), mu)


def step(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
         sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step per row: ``sample + (sigma_next - sigma) * velocity`` in float32, returned in
    the velocity's dtype (as the scheduler does).

    sample, velocity: ``(B, ...)`` (Flux's packed ``(B, N, 4C)`` or SD3's ``(B, C, H, W)``);
    sigma, sigma_next: ``(B,)``.
    """
    shape = (-1,) + (1,) * (sample.dim() - 1)
    dt = (sigma_next.to(sample.device, torch.float32) - sigma.to(sample.device, torch.float32)).view(shape)
    return (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)

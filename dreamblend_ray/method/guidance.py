"""Pure tensor maths of DreamBlend guidance: CFG, token masks, the attention distance,
the latent update and the step-size schedule. No models, no state.

The choices are registries by name: ``DISTANCES`` (attention-map distances) and ``ETA_SCHEDULES``
(step-size schedules). ``SamplingConfig.distance`` / ``.eta_schedule`` are validated against
them and the sampler looks them up, so adding one is a decorated function here (and its test).

Shapes: B = samples, P = pixels of a layer (H*W), T = text tokens, C/H/W = latent dims.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Distance = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
Schedule = Callable[[float], float]

DISTANCES: dict[str, Distance] = {}
ETA_SCHEDULES: dict[str, Schedule] = {}


def register(registry: dict, name: str):
    """Decorator: add a function to a registry under ``name`` (a name is registered once)."""
    def add(fn):
        if name in registry:
            raise ValueError(f"{name!r} is already registered")
        registry[name] = fn
        return fn
    return add


def lookup(registry: dict, kind: str, name: str):
    """``registry[name]``, or a ValueError listing the registered names."""
    if name not in registry:
        raise ValueError(f"{kind} must be one of {sorted(registry)}, got {name!r}")
    return registry[name]


def cfg_combine(noise: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022).

    noise: ``(2B, C, H, W)`` with rows ``[uncond; cond]`` (diffusers' order). Returns ``(B, C, H, W)``:
    ``uncond + scale * (cond - uncond)``.
    """
    uncond, cond = noise.chunk(2)
    return uncond + scale * (cond - uncond)


def prompt_token_mask(input_ids: torch.Tensor, eos_token_id: int,
                      token_indices: tuple[int, ...] = ()) -> torch.Tensor:
    """Which text tokens the guidance compares: ``(B, T)`` bool.

    Every prompt token between the start-of-text token (position 0) and the first end-of-text
    token; padding and the special tokens are excluded. ``token_indices`` (1-based positions within
    the prompt, as in Attend-and-Excite) restricts the selection further.
    """
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    is_eos = (input_ids == eos_token_id) & (positions > 0)
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, length)).min(dim=1).values
    mask = (positions > 0) & (positions < first_eos[:, None])
    if token_indices:
        chosen = torch.zeros(length, dtype=torch.bool, device=input_ids.device)
        chosen[[i for i in token_indices if i < length]] = True
        mask = mask & chosen
    return mask


def attention_distance(maps_e: dict[str, torch.Tensor], maps_g: dict[str, torch.Tensor],
                       token_mask: torch.Tensor, name: str = "l1") -> torch.Tensor:
    """The registered distance ``name`` between E's and G's maps, per sample: ``(B,)``."""
    if set(maps_e) != set(maps_g):
        raise ValueError(f"layers differ: {sorted(set(maps_e) ^ set(maps_g))}")
    return lookup(DISTANCES, "distance", name)(maps_e, maps_g, token_mask)


@register(DISTANCES, "l1")
def l1_distance(maps_e: dict[str, torch.Tensor], maps_g: dict[str, torch.Tensor],
                token_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 distance between E's and G's cross-attention maps: ``(B,)``.

    maps_*: layer name -> ``(B, P, T)`` attention probabilities (softmax over T, head mean).
    token_mask: ``(B, T)`` bool, the compared tokens.

    Normalisation: for each layer, the L1 difference over the selected tokens is summed per pixel
    and averaged over pixels; layers are averaged. A pixel's probabilities over the selected tokens
    sum to at most 1, so the distance lies in [0, 2]: 0 for identical maps, 2 for maps that put all
    their mass on different tokens. It does not grow with resolution, layer count or prompt length,
    which keeps one alpha meaningful across models and prompts.
    """
    weight = token_mask[:, None, :].to(torch.float32)
    per_layer = [((maps_e[name].float() - maps_g[name].float()).abs() * weight).sum(-1).mean(-1)
                 for name in sorted(maps_e)]
    return torch.stack(per_layer).mean(0)


def latent_update(latents: torch.Tensor, grad: torch.Tensor, distance: torch.Tensor,
                  alpha: float, eta: float) -> torch.Tensor:
    """One guidance step on E's latents: ``z - alpha * eta * d_b * grad_b / rms(grad_b)``.

    latents, grad: ``(B, C, H, W)``; grad = dL/dz of the attention distance. distance: ``(B,)``.

    This is the method's ``z - eta_t * dL/dz`` with ``L = alpha * d`` and a per-sample step
    ``eta_t = eta * d_b / rms(dd/dz_b)``: the gradient's direction with a length in latent units
    proportional to how far the maps still are apart. Raw gradient norms vary by orders of
    magnitude between models, layers and timesteps; this rule does not, it vanishes when the
    maps agree (G = E gives exactly plain sampling), and each sample moves by its own gradient only
    (batch invariance).
    """
    flat = grad.flatten(1).float()
    rms = flat.pow(2).mean(dim=1).sqrt()
    scale = torch.where(rms > 0, alpha * eta * distance.float() / rms.clamp_min(1e-30),
                        torch.zeros_like(rms))
    return latents - (scale.view(-1, *[1] * (grad.dim() - 1)) * grad.float()).to(latents.dtype)


def step_size(schedule: str, base: float, index: int, window: int) -> float:
    """eta_i for guided step ``index`` of ``window``: ``base`` times the registered schedule's
    factor at ``index / window``. The decaying schedules fade the guidance out before the window
    ends, so releasing it does not jolt the trajectory."""
    if window <= 0:
        return 0.0
    return base * lookup(ETA_SCHEDULES, "eta_schedule", schedule)(index / window)


@register(ETA_SCHEDULES, "constant")
def constant_schedule(frac: float) -> float:
    return 1.0


@register(ETA_SCHEDULES, "linear")
def linear_schedule(frac: float) -> float:
    return 1.0 - frac


@register(ETA_SCHEDULES, "cosine")
def cosine_schedule(frac: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * frac))

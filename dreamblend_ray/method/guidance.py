"""Pure tensor maths of DreamBlend guidance: CFG, token masks, the attention distance,
the latent update and the step-size schedule. No models, no state.

Shapes: B = samples, P = pixels of a layer (H*W), T = text tokens, C/H/W = latent dims.
"""

from __future__ import annotations

import math

import torch


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
    if set(maps_e) != set(maps_g):
        raise ValueError(f"layers differ: {sorted(set(maps_e) ^ set(maps_g))}")
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
    """eta_i for guided step ``index`` of ``window``.

    constant: ``base``; linear: ``base * (1 - index / window)``;
    cosine: ``base * (1 + cos(pi * index / window)) / 2``. The decaying schedules fade the
    guidance out before the window ends, so releasing it does not jolt the trajectory.
    """
    if window <= 0:
        return 0.0
    frac = index / window
    if schedule == "constant":
        return base
    if schedule == "linear":
        return base * (1.0 - frac)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"eta_schedule must be one of ['constant', 'linear', 'cosine'], got {schedule!r}")

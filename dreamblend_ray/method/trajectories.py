"""What every DreamBlend sampler shares, whatever the family: input checks, per-sample noise,
the trajectory plan (which of G, E and unguided E run, and their heat-map averagers) and the
result. ``method/sampler.py`` (DDIM, UNets) and ``method/flow_sampler.py`` (flow matching,
transformers) build on it.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dreamblend_ray.config import MAX_SEED, SamplingConfig
from dreamblend_ray.method.heatmaps import MapAverager


@dataclass
class SampleResult:
    """E's images, optionally G's reference images, and the per-step E-to-G attention distance.

    arrays: ``(B, H, W, 3)`` float32 in [0, 1] (the decoded images before 8-bit quantisation).
    attention_distance: ``(B, S)`` for the S steps where it was measured (the guidance window).
    attention_maps (``config.attention_maps``): ``{"guidance", "edit", "dreamblend"}`` -> ``(B, T, H, W)``,
    each token's map averaged over the selected layers (on the finest one's grid) and the map steps;
    "edit" is E unguided, whose images are ``edit_images`` (G's are the reference images).
    """

    images: list[Image.Image]
    arrays: np.ndarray
    reference_images: list[Image.Image] | None
    reference_arrays: np.ndarray | None
    attention_distance: torch.Tensor
    seconds: float
    attention_maps: dict[str, torch.Tensor] | None = None
    edit_images: list[Image.Image] | None = None
    edit_arrays: np.ndarray | None = None


def initial_latents(seeds: list[int], shape: tuple[int, ...], device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """One CPU generator per sample (device-independent noise), as diffusers does for a list."""
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
             for seed in seeds]
    return torch.cat(noise).to(device)


def to_pil(arrays: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arrays]


class SamplerBase:
    """Input checks and result assembly; subclasses implement ``sample`` and ``_decode``."""

    def __init__(self, components):
        self.components = components

    def check_inputs(self, prompts, seeds, config, negative_prompts) -> tuple[int, int]:
        if not isinstance(config, SamplingConfig):
            raise ValueError(f"config must be a SamplingConfig, got {type(config).__name__}")
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if len(seeds) != len(prompts):
            raise ValueError(f"seeds: got {len(seeds)} seeds for {len(prompts)} prompts; give one per prompt")
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seeds must be integers in [0, {MAX_SEED}], got {seed!r}")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"negative_prompts: got {len(negative_prompts)} for {len(prompts)} prompts")
        factor = self.components.vae_scale_factor
        height = config.height or self.components.default_size
        width = config.width or self.components.default_size
        for name, value in (("height", height), ("width", width)):
            if value % factor:
                raise ValueError(f"{name} must be divisible by the VAE factor {factor}, got {value}")
        return height, width

    def _decode(self, latents) -> np.ndarray:
        raise NotImplementedError

    def _result(self, z_e, z_g, z_p, distances, plan: "TrajectoryPlan", start) -> SampleResult:
        arrays = self._decode(z_e)
        ref = None if z_g is None else self._decode(z_g)
        plain = None if z_p is None else self._decode(z_p)
        if plan.maps_wanted:  # without a separate trajectory, G (identical pair) or E (unguided) is DreamBlend's
            ref = arrays if ref is None else ref
            plain = arrays if plain is None else plain
        dist = torch.stack(distances, dim=1) if distances else torch.zeros(len(arrays), 0)
        return SampleResult(to_pil(arrays), arrays, None if ref is None else to_pil(ref), ref,
                            dist, time.perf_counter() - start, attention_maps=plan.maps(),
                            edit_images=None if plain is None else to_pil(plain), edit_arrays=plain)

    @staticmethod
    def _undecoded(distances, count: int, plan: "TrajectoryPlan", start) -> SampleResult:
        dist = torch.stack(distances, dim=1) if distances else torch.zeros(count, 0)
        return SampleResult([], np.zeros((0, 0, 0, 3), np.float32), None, None, dist,
                            time.perf_counter() - start, attention_maps=plan.maps())


@dataclass
class TrajectoryPlan:
    """Which trajectories a call runs beyond DreamBlend's E, and their heat-map averagers.

    G runs every step when its images or maps are wanted (else only inside the measured window);
    unguided E runs as a third trajectory only when maps are wanted and guidance changes E (alpha
    > 0, a window, G differs from E): otherwise it IS DreamBlend's E (the alpha = 0 property), and
    for an identical pair G is too.
    """

    maps_wanted: bool
    identical: bool
    run_guidance: bool
    run_plain: bool
    return_guidance: bool
    map_steps: range
    averagers: dict[str, MapAverager]

    @classmethod
    def of(cls, config: SamplingConfig, identical: bool, latent_hw) -> "TrajectoryPlan":
        wanted = config.attention_maps
        changes_e = config.alpha > 0 and config.window > 0 and not identical
        rows = ("guidance", "edit", "dreamblend") if wanted else ()
        return cls(maps_wanted=wanted, identical=identical,
                   run_guidance=config.return_reference or (wanted and not identical),
                   run_plain=wanted and changes_e,
                   return_guidance=config.return_reference or (wanted and not identical),
                   map_steps=config.map_steps if wanted else range(0),
                   averagers={row: MapAverager(tuple(latent_hw)) for row in rows})

    def add(self, row: str, maps: dict, mapped: bool) -> None:
        if mapped and maps and not (row == "guidance" and self.identical):  # G = E: DreamBlend's maps
            self.averagers[row].add(maps)

    def maps(self) -> dict[str, torch.Tensor] | None:
        """``{"guidance", "edit", "dreamblend"}`` -> ``(B, T, H, W)`` step-averaged token maps."""
        if not self.maps_wanted:
            return None
        means = {row: averager.mean() for row, averager in self.averagers.items()}
        if means["edit"] is None:
            means["edit"] = means["dreamblend"]
        if means["guidance"] is None:
            means["guidance"] = means["edit"]
        return means


def stepwise(steps, lock, contexts):
    """Yield each step with ``lock`` held (when given) and ``contexts()`` entered, both released
    between steps; close it (``contextlib.closing``) so that an exception releases them."""
    for step in steps:
        with lock if lock is not None else nullcontext(), ExitStack() as stack:
            for context in contexts():
                stack.enter_context(context)
            yield step

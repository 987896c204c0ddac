"""The DreamBlend sampler: E (late checkpoint) sampled with DDIM+CFG while its cross-attention maps
are steered toward those of G (early checkpoint), run in lockstep on the same prompt and noise.

Algorithm (ARCHITECTURE.md, "The method")::

    z_G = z_E = noise(seed_b)
    for i, t in enumerate(timesteps):
        if i < K or reference wanted:  eps_G, A_G = G(z_G, t); z_G = ddim(z_G, eps_G)
        if i < K and alpha > 0:        z_E = z_E - eta_i * dL/dz_E, L = alpha * d(A_E(z_E), A_G)
        eps_E = E(z_E, t);             z_E = ddim(z_E, eps_E)

Every sample has its own generator, and every operation acts per sample, so a sample's image
depends only on its own prompt, seed and settings (batch invariance).
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
import numpy as np
import torch
from diffusers import DDIMScheduler

from dreamblend_ray.method import guidance
from dreamblend_ray.method.flow_sampler import FlowSampler
from dreamblend_ray.method.attention import Recorder, StopForward, recording, select_layers
from dreamblend_ray.models.components import Components
from dreamblend_ray.models.prompts import Conditioning, prompt_conditioning
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method.pair import single
from dreamblend_ray.method.trajectories import (  # noqa: F401 - SampleResult, initial_latents, to_pil re-exported
    SamplerBase, SampleResult, TrajectoryPlan, initial_latents, stepwise, to_pil)

logger = logging.getLogger(__name__)


def decode_latents(components: Components, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode to ``(B, 3, H, W)`` float32 in [0, 1]; honours per-channel latent statistics."""
    vae = components.vae
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    image = vae.decode(latents.to(vae.dtype)).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)


class DreamBlendSampler(SamplerBase):
    """Lockstep G/E DDIM sampling with cross-attention guidance. Not thread-safe per base UNet.
    A flow-matching family (Flux, SD3) is sampled by ``method/flow_sampler.py`` instead."""

    # ------------------------------------------------------------------ model calls

    @staticmethod
    def predict_noise(unet, recorder: Recorder, latents, t, cond: Conditioning, scale: float,
                      record: bool) -> tuple[torch.Tensor, dict]:
        """CFG noise prediction; the conditional branch's maps when ``record``."""
        model_input = torch.cat([latents] * 2) if cond.do_cfg else latents
        maps = {}
        if record:
            with recorder.capture(rows=cond.cond_rows) as store:
                noise = unet(model_input, t, encoder_hidden_states=cond.embeds,
                             added_cond_kwargs=cond.added_cond_kwargs).sample
            maps = store.maps
        else:
            noise = unet(model_input, t, encoder_hidden_states=cond.embeds,
                         added_cond_kwargs=cond.added_cond_kwargs).sample
        return (guidance.cfg_combine(noise, scale) if cond.do_cfg else noise), maps

    @staticmethod
    def guide(unet, recorder: Recorder, latents, t, cond: Conditioning, maps_g: dict,
              mask: torch.Tensor, last_layer: str, alpha: float, eta: float,
              distance_name: str = "l1") -> torch.Tensor:
        """One attention-guidance step on E's latents (gradient through E's cond branch only)."""
        cond_only = cond.cond_only()
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad(), recorder.capture(rows=slice(None), keep_graph=True,
                                                   stop_after=last_layer) as store:
            try:
                unet(z, t, encoder_hidden_states=cond_only.embeds,
                     added_cond_kwargs=cond_only.added_cond_kwargs)
            except StopForward:
                pass  # the rest of the UNet does not affect the selected maps
            distance = guidance.attention_distance(store.maps, maps_g, mask, distance_name)
            (grad,) = torch.autograd.grad(distance.sum(), z)
        return guidance.latent_update(latents, grad, distance.detach(), alpha, eta)

    # ------------------------------------------------------------------ the loop

    @torch.no_grad()
    def sample(self, pair, prompts: list[str], seeds: list[int], config: SamplingConfig = SamplingConfig(),
               negative_prompts: list[str] | None = None, callback=None,
               track_distance: bool = False, decode: bool = True, step_lock=None) -> SampleResult:
        """Generate one image per (prompt, seed). ``callback(step, total)`` after every step.

        step_lock: held for each denoising step (with the attention recording installed) and
        released between steps, so another user of the UNet (the replica's continuous batch) runs
        between two steps instead of waiting for the whole call (``stepwise``).

        track_distance: measure the E-to-G distance inside the window even when alpha = 0
        (G then runs in the window); with alpha > 0 it is always measured.
        config.attention_maps: also average each trajectory's cross-attention maps over
        ``config.map_steps`` (G, DreamBlend's E, and unguided E, which then runs as a third
        trajectory when guidance changes anything); G's and unguided E's images come back too.
        decode: False skips the VAE (no images; for attention probes).
        """
        if self.components.model_family.flow_matching:  # Flux, SD3
            return FlowSampler(self.components).sample(pair, prompts, seeds, config, negative_prompts, callback,
                                                       track_distance, decode, step_lock)
        height, width = self.check_inputs(prompts, seeds, config, negative_prompts)
        start = time.perf_counter()
        c = self.components
        scheduler = DDIMScheduler.from_config(c.scheduler.config)
        scheduler.set_timesteps(config.num_inference_steps, device=c.device)
        cond = prompt_conditioning(c, list(prompts), negative_prompts, c.model_family.uses_cfg(c, config),
                                   height, width)
        mask = guidance.prompt_token_mask(cond.input_ids, c.tokenizer.eos_token_id, config.token_indices)
        layers = select_layers(pair.unets[0], config.layers)
        shape = (1, c.unet.config.in_channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
        z_e = initial_latents(seeds, shape, c.device, c.unet.dtype) * scheduler.init_noise_sigma
        window, guided_any = config.window, config.alpha > 0
        plan = TrajectoryPlan.of(config, pair.identical, shape[2:])
        z_g, z_p = z_e.clone(), z_e.clone()
        recorder, distances = Recorder(), []
        total = len(scheduler.timesteps)
        steps = stepwise(enumerate(scheduler.timesteps), step_lock,
                         lambda: [recording(unet, layers, recorder) for unet in pair.unets])
        with closing(steps):
            for i, t in steps:
                guided = guided_any and i < window
                measured = i < window and (guided or track_distance)
                mapped = i in plan.map_steps
                if measured or plan.run_guidance:
                    with pair.guidance() as unet_g:
                        eps_g, maps_g = self.predict_noise(unet_g, recorder, z_g, t, cond,
                                                           config.guidance_scale, record=measured or mapped)
                    z_g = scheduler.step(eps_g, t, z_g).prev_sample
                    plan.add("guidance", maps_g, mapped)
                with pair.edit() as unet_e:
                    if guided:
                        eta = guidance.step_size(config.eta_schedule, config.step_size, i, window)
                        z_e = self.guide(unet_e, recorder, z_e, t, cond, maps_g, mask,
                                         layers[-1].name, config.alpha, eta, config.distance)
                    eps_e, maps_e = self.predict_noise(unet_e, recorder, z_e, t, cond,
                                                       config.guidance_scale, record=measured or mapped)
                    if plan.run_plain:
                        eps_p, maps_p = self.predict_noise(unet_e, recorder, z_p, t, cond,
                                                           config.guidance_scale, record=mapped)
                        z_p = scheduler.step(eps_p, t, z_p).prev_sample
                        plan.add("edit", maps_p, mapped)
                plan.add("dreamblend", maps_e, mapped)
                if measured:
                    distances.append(guidance.attention_distance(maps_e, maps_g, mask,
                                                                 config.distance).cpu())
                z_e = scheduler.step(eps_e, t, z_e).prev_sample
                if callback is not None:
                    callback(i + 1, total)
        if not decode:
            return self._undecoded(distances, len(prompts), plan, start)
        return self._result(z_e, z_g if plan.return_guidance else None, z_p if plan.run_plain else None,
                            distances, plan, start)

    def _decode(self, latents) -> np.ndarray:
        return decode_latents(self.components, latents).permute(0, 2, 3, 1).cpu().numpy()


def plain_sample(components: Components, unet, prompts: list[str], seeds: list[int],
                 num_inference_steps: int = 30, guidance_scale: float = 3.0,
                 negative_prompts: list[str] | None = None) -> SampleResult:
    """Plain DDIM+CFG sampling of one UNet (DreamBlend with alpha = 0)."""
    config = SamplingConfig(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, alpha=0.0)
    return DreamBlendSampler(components).sample(single(unet), prompts, seeds, config, negative_prompts)

"""DreamBlend on flow-matching transformers (Flux, SD3): E sampled with flow-matching Euler while
its joint-attention image-to-text maps are steered toward G's, in lockstep on the same prompt and noise.

The algorithm of ``method/sampler.py`` with three substitutions, all asked of the family
(``models/flux.py``, ``models/sd3.py``) or of ``method/flow.py``::

    z_G = z_E = pack(noise(seed_b))                  # Flux: 2x2 patches; SD3: as is
    for i, t in enumerate(timesteps):                # the pipeline's sigmas (Flux: shift from N_img)
        if i < K or reference wanted:  v_G, A_G = G(z_G, t); z_G = z_G + (s_{i+1} - s_i) v_G
        if i < K and alpha > 0:        z_E = z_E - eta_i * dL/dz_E, L = alpha * d(A_E(z_E), A_G)
        v_E = E(z_E, t);               z_E = z_E + (s_{i+1} - s_i) v_E
    decode(unpack(z_E) / scale + shift)

A are the joint blocks' image-to-text maps (``method/joint_attention.py``), compared over the T5
prompt tokens. Flux runs without CFG (its guidance is embedded), SD3 with it. Every sample has its
own generator and every operation is per row (batch invariance).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, closing

import numpy as np
import torch

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method import flow, guidance
from dreamblend_ray.method.attention import Recorder, StopForward
from dreamblend_ray.method.joint_attention import recording_joint, select_joint_layers
from dreamblend_ray.method.trajectories import SampleResult, SamplerBase, TrajectoryPlan, initial_latents, stepwise
from dreamblend_ray.models.prompts import Conditioning, prompt_conditioning


def negative_without_cfg(family) -> str:
    """The error for a negative prompt on a sampling call without classifier-free guidance."""
    if family.name == "flux":
        return ("negative prompts need classifier-free guidance, which FLUX.1 runs only with true_cfg_scale > 1 "
                "(its guidance_scale is the embedded guidance)")
    return f"negative prompts need classifier-free guidance, which {family.name} runs only with guidance_scale > 1"


def joint_layers_for(transformer, selection) -> list:
    """The joint layers a :class:`LayerSelection` names (its ``streams`` and ``blocks``)."""
    return select_joint_layers(transformer, tuple(selection.streams), tuple(selection.blocks))


class FlowSampler(SamplerBase):
    """Lockstep G/E flow-matching sampling with joint-attention guidance. The maps' softmax is
    ``config.layers.normalisation``: over the text tokens, or the block's own joint softmax
    restricted to them (``method/joint_attention.py``)."""

    def __init__(self, components):
        super().__init__(components)
        self.family = components.model_family

    def check_flow_inputs(self, prompts, seeds, config, negative_prompts) -> tuple[int, int, bool]:
        height, width = self.check_inputs(prompts, seeds, config, negative_prompts)
        multiple = self.family.latent_multiple(self.components)
        for name, value in (("height", height), ("width", width)):
            if value % multiple:
                raise ValueError(f"{name} must be divisible by {multiple} on {self.family.name}, got {value}")
        do_cfg = self.family.uses_cfg(self.components, config)
        if negative_prompts is not None and not do_cfg:
            raise ValueError(negative_without_cfg(self.family))
        return height, width, do_cfg

    def velocity(self, model, recorder: Recorder, latents, t, cond: Conditioning, config: SamplingConfig,
                 latent_hw, record: bool) -> tuple[torch.Tensor, dict]:
        """The (CFG-combined) velocity of ``latents`` at timestep ``t``; the cond rows' maps when ``record``."""
        model_input = torch.cat([latents] * 2) if cond.do_cfg else latents
        timesteps = t.expand(model_input.shape[0]).to(model_input.device)
        maps = {}
        with ExitStack() as stack:
            if record:
                store = stack.enter_context(recorder.capture(rows=cond.cond_rows))
                store.text_length = cond.embeds.shape[1]
            out = self.family.denoise(model, model_input, timesteps, cond.embeds, cond.added_cond_kwargs,
                                      config.guidance_scale, latent_hw)
            maps = store.maps if record else {}
        return (guidance.cfg_combine(out, self.family.cfg_scale(config)) if cond.do_cfg else out), maps

    def guide_flow(self, model, recorder: Recorder, latents, t, cond: Conditioning, config: SamplingConfig,
                   latent_hw, maps_g: dict, mask, last_layer: str, eta: float) -> torch.Tensor:
        """One attention-guidance step on E's latents (gradient through E's cond rows only)."""
        cond_only = cond.cond_only()
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad(), recorder.capture(rows=slice(None), keep_graph=True,
                                                   stop_after=last_layer) as store:
            store.text_length = cond_only.embeds.shape[1]
            try:
                self.family.denoise(model, z, t.expand(z.shape[0]).to(z.device), cond_only.embeds,
                                    cond_only.added_cond_kwargs, config.guidance_scale, latent_hw)
            except StopForward:
                pass  # the later blocks do not affect the selected maps
            distance = guidance.attention_distance(store.maps, maps_g, mask, config.distance)
            (grad,) = torch.autograd.grad(distance.sum(), z)
        return guidance.latent_update(latents, grad, distance.detach(), config.alpha, eta)

    @torch.no_grad()
    def sample(self, pair, prompts: list[str], seeds: list[int], config: SamplingConfig = SamplingConfig(),
               negative_prompts: list[str] | None = None, callback=None,
               track_distance: bool = False, decode: bool = True, step_lock=None) -> SampleResult:
        """As ``DreamBlendSampler.sample`` (method/sampler.py), on a flow-matching transformer family."""
        height, width, do_cfg = self.check_flow_inputs(prompts, seeds, config, negative_prompts)
        start = time.perf_counter()
        c, family = self.components, self.family
        latent_hw = (height // c.vae_scale_factor, width // c.vae_scale_factor)
        cond = prompt_conditioning(c, list(prompts), negative_prompts, do_cfg, height, width)
        mask = family.token_mask(c, cond.input_ids, config.token_indices)
        layers = joint_layers_for(pair.unets[0], config.layers)
        plan_schedule = flow.schedule(c.scheduler.config, config.num_inference_steps,
                                      family.image_seq_len(c, *latent_hw), family.custom_sigmas,
                                      family.max_shift_default)
        noise = initial_latents(seeds, (1, family.latent_channels(c), *latent_hw), c.device, cond.embeds.dtype)
        z_e = family.pack(noise)
        window, guided_any = config.window, config.alpha > 0
        plan = TrajectoryPlan.of(config, pair.identical, latent_hw)
        z_g, z_p = z_e.clone(), z_e.clone()
        recorder, distances = Recorder(), []
        sigmas, rows = plan_schedule.sigmas, z_e.shape[0]
        steps = stepwise(enumerate(plan_schedule.timesteps.to(c.device)), step_lock, lambda: [
            recording_joint(model, layers, recorder, config.layers.normalisation) for model in pair.unets])
        with closing(steps):
            for i, t in steps:
                guided = guided_any and i < window
                measured = i < window and (guided or track_distance)
                mapped = i in plan.map_steps
                sigma, sigma_next = sigmas[i].expand(rows), sigmas[i + 1].expand(rows)

                def advance(z, v):
                    return flow.step(z, v, sigma, sigma_next)

                if measured or plan.run_guidance:
                    with pair.guidance() as model_g:
                        v_g, maps_g = self.velocity(model_g, recorder, z_g, t, cond, config, latent_hw,
                                                    record=measured or mapped)
                    z_g = advance(z_g, v_g)
                    plan.add("guidance", maps_g, mapped)
                with pair.edit() as model_e:
                    if guided:
                        eta = guidance.step_size(config.eta_schedule, config.step_size, i, window)
                        z_e = self.guide_flow(model_e, recorder, z_e, t, cond, config, latent_hw, maps_g, mask,
                                              layers[-1].name, eta)
                    v_e, maps_e = self.velocity(model_e, recorder, z_e, t, cond, config, latent_hw,
                                                record=measured or mapped)
                    if plan.run_plain:
                        v_p, maps_p = self.velocity(model_e, recorder, z_p, t, cond, config, latent_hw,
                                                    record=mapped)
                        z_p = advance(z_p, v_p)
                        plan.add("edit", maps_p, mapped)
                plan.add("dreamblend", maps_e, mapped)
                if measured:
                    distances.append(guidance.attention_distance(maps_e, maps_g, mask, config.distance).cpu())
                z_e = advance(z_e, v_e)
                if callback is not None:
                    callback(i + 1, len(plan_schedule))
        if not decode:
            return self._undecoded(distances, len(prompts), plan, start)
        self._latent_hw = latent_hw
        return self._result(z_e, z_g if plan.return_guidance else None, z_p if plan.run_plain else None,
                            distances, plan, start)

    def _decode(self, latents) -> np.ndarray:
        return decode_flow_latents(self.components, latents, self._latent_hw).permute(0, 2, 3, 1).cpu().numpy()


def decode_flow_latents(components, latents: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Unpack, undo the VAE's shift and scale, decode: ``(B, 3, H, W)`` float32 in [0, 1]."""
    family, vae = components.model_family, components.vae
    latents = family.to_vae_latents(vae, family.unpack(latents, *latent_hw))
    image = vae.decode(latents.to(vae.dtype)).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)

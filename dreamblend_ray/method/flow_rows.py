"""Rows (continuous, cross-subject batching) for the flow-matching families (Flux, SD3).

``method/rows.py``'s engine with the transformer in the UNet's place: each row keeps its latents
in the family's layout (Flux: packed 2x2 patches), its own flow-matching schedule (the sigmas of its
step count and image token count, ``method/flow.py``), the joint-attention maps of
``method/joint_attention.py`` and, on Flux, its own embedded guidance scale. Everything else (per-row
adapters, G co-batched one step ahead in E's call, the guidance step) is the engine's own.
:func:`row_engine` picks the engine for a base.
"""

from __future__ import annotations

import numpy as np
import torch

from dreamblend_ray.method import flow
from dreamblend_ray.method.flow_sampler import decode_flow_latents, joint_layers_for, negative_without_cfg
from dreamblend_ray.method.joint_attention import recording_joint
from dreamblend_ray.method.rows import Row, RowEngine, RowRequest
from dreamblend_ray.method.trajectories import initial_latents


def row_engine(components, **kwargs) -> RowEngine:
    """The row engine of ``components``' family: :class:`FlowRowEngine` for Flux and SD3, else ``RowEngine``."""
    return (FlowRowEngine if components.model_family.flow_matching else RowEngine)(components, **kwargs)


class FlowRowEngine(RowEngine):
    """Advances Flux/SD3 rows of any subjects, each at its own step. Not thread-safe per transformer."""

    flow = True

    def __init__(self, components, co_batch: bool = True, adapter_method: str = "gather",
                 co_batch_limit: int | None = None):
        if not components.model_family.flow_matching:
            raise ValueError(f"FlowRowEngine runs the flow-matching families; {components.family!r} is not one")
        super().__init__(components, co_batch, adapter_method, co_batch_limit)
        self.family = components.model_family
        self._schedules: dict[tuple[int, int], flow.FlowSchedule] = {}

    def schedule(self, steps: int, latent_hw: tuple[int, int]) -> flow.FlowSchedule:
        """The pipeline's schedule for ``steps`` steps at this latent size (cached)."""
        key = (steps, self.family.image_seq_len(self.components, *latent_hw))
        if key not in self._schedules:
            self._schedules[key] = flow.schedule(self.components.scheduler.config, steps, key[1],
                                                 self.family.custom_sigmas, self.family.max_shift_default)
        return self._schedules[key]

    def _check(self, request: RowRequest) -> None:
        super()._check(request)
        multiple = self.family.latent_multiple(self.components)
        size = self.components.default_size
        for name, value in (("height", request.config.height or size), ("width", request.config.width or size)):
            if value % multiple:
                raise ValueError(f"{name} must be divisible by {multiple} on {self.family.name}, got {value}")
        if request.negative_prompt is not None and not self.family.uses_cfg(self.components, request.config):
            raise ValueError(negative_without_cfg(self.family))

    def _row(self, request: RowRequest, tag, cond, k: int, height: int, width: int) -> Row:
        c, n = self.components, cond.batch
        parts = [slice(k, k + 1)] if not cond.do_cfg else [slice(k, k + 1), slice(n + k, n + k + 1)]
        embeds = torch.cat([cond.embeds[part] for part in parts])
        added = {key: torch.cat([value[part] for part in parts]) for key, value in cond.added_cond_kwargs.items()}
        mask = self.family.token_mask(c, cond.input_ids[k:k + 1], request.config.token_indices)
        latent_hw = (height // c.vae_scale_factor, width // c.vae_scale_factor)
        noise = initial_latents([request.seed], (1, self.family.latent_channels(c), *latent_hw), self.device,
                                self.dtype)
        z = self.family.pack(noise)
        timesteps = self.schedule(request.config.num_inference_steps, latent_hw).timesteps.tolist()
        return Row(request, timesteps, z, z.clone(), embeds, added, mask, tag)

    def layers(self, selection) -> list:
        if selection not in self._layers_cache:
            self._layers_cache[selection] = joint_layers_for(self.components.transformer, selection)
        return self._layers_cache[selection]

    def _recording(self, layers, selection):
        return recording_joint(self.components.transformer, layers, self.recorder, selection.normalisation)

    def _call(self, model_input, t, embeds, added, rows: list[Row]) -> torch.Tensor:
        scales = torch.tensor([row.config.guidance_scale for row in rows], dtype=torch.float32)
        store = self.recorder.store
        if store is not None:
            store.text_length = embeds.shape[1]
        return self.family.denoise(self.components.transformer, model_input, t, embeds, added, scales,
                                   self._latent_hw(rows[0]))

    def _timesteps(self, values: list, cfg: bool) -> torch.Tensor:
        t = torch.tensor(values, device=self.device, dtype=torch.float32)
        return torch.cat([t, t]) if cfg else t

    def _ddim(self, z: torch.Tensor, eps: torch.Tensor, steps: list, rows: list[Row]) -> torch.Tensor:
        """The flow-matching Euler step of each row from its timestep ``steps[b]`` to its next sigma."""
        sigma, sigma_next = [], []
        for row, t in zip(rows, steps):
            schedule = self.schedule(len(row.timesteps), self._latent_hw(row))
            i = row.timesteps.index(t)
            sigma.append(schedule.sigmas[i])
            sigma_next.append(schedule.sigmas[i + 1])
        return flow.step(z, eps, torch.stack(sigma), torch.stack(sigma_next))

    def _latent_hw(self, row: Row) -> tuple[int, int]:
        size, factor = self.components.default_size, self.components.vae_scale_factor
        return ((row.config.height or size) // factor, (row.config.width or size) // factor)

    @torch.no_grad()
    def decode(self, rows: list[Row]) -> np.ndarray:
        latents = torch.cat([row.z_e for row in rows])
        return decode_flow_latents(self.components, latents, self._latent_hw(rows[0])).permute(0, 2, 3, 1).cpu().numpy()

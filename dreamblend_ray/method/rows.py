"""DreamBlend one row at a time: every sample carries its own adapters, settings, timestep index
and guidance window, so rows of different subjects, and rows that joined at different steps,
share UNet calls (continuous, cross-subject batching; docs/serving.md).

The maths per row is the sampler's (``method/sampler.py``, ARCHITECTURE.md "The method")::

    if i < K and alpha > 0:  eps_G, A_G = G(z_G, t_i); z_G = ddim(z_G, eps_G)
                             z_E = z_E - eta_i * dL/dz_E,  L = alpha * d(A_E(z_E), A_G)
    eps_E = E(z_E, t_i);     z_E = ddim(z_E, eps_E)

What changes is who shares a call. :meth:`RowEngine.step` advances any set of rows by one step
each: G's rows in one UNet call, the guided rows' gradient in one, and E's rows in one, each row
with its own LoRA adapter (``method/row_adapters.py``), timestep, CFG scale and DDIM stride
(``method/ddim.py``). With ``co_batch`` G runs one step ahead inside E's call: G's step i + 1
depends only on G's own trajectory, so it needs not wait for E's guided step i, and a guided step
costs two UNet calls instead of three.

Rows can share a step only when their latents and text have one shape and the guidance reads the
same layers: :func:`row_key`. Requests that need the sampler's extras (heat maps, G's reference
images) or two full UNets go through ``DreamBlendSampler`` instead (``SamplingConfig.row_batchable``).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from dreamblend_ray.config import MAX_SEED, SamplingConfig
from dreamblend_ray.method import ddim, guidance
from dreamblend_ray.method.attention import Recorder, StopForward, recording, select_layers
from dreamblend_ray.method.row_adapters import BASE, METHODS, per_row
from dreamblend_ray.method.sampler import decode_latents, initial_latents
from dreamblend_ray.models.components import Components
from dreamblend_ray.models.prompts import prompt_conditioning


@dataclass(frozen=True)
class RowRequest:
    """One image: its prompt, seed, settings and the adapters of its G and E (:data:`BASE`: none)."""

    prompt: str
    seed: int
    config: SamplingConfig
    guidance_adapter: str = BASE
    edit_adapter: str = BASE
    negative_prompt: str | None = None


def row_key(config: SamplingConfig, components: Components) -> tuple:
    """Rows with equal keys can share UNet calls: same latent size, CFG on/off and guidance layers."""
    size = components.default_size
    return (config.height or size, config.width or size,
            components.model_family.uses_cfg(components, config), config.layers, config.distance)


@dataclass
class Row:
    """One sample in flight: its latents, conditioning and where it is in its own schedule."""

    request: RowRequest
    timesteps: list[int]
    z_e: torch.Tensor  # (1, C, h, w)
    z_g: torch.Tensor
    embeds: torch.Tensor  # (2, T, D) [uncond; cond] under CFG, else (1, T, D)
    added: dict | None  # the family's added conditioning, row-aligned with embeds
    mask: torch.Tensor  # (1, T) the tokens the guidance compares
    tag: object = None  # the caller's (e.g. which job and image)
    index: int = 0  # the next step to take
    g_index: int = -1  # the step G's maps_g belong to
    maps_g: dict = field(default_factory=dict)
    distances: list[float] = field(default_factory=list)

    @property
    def config(self) -> SamplingConfig:
        return self.request.config

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    def guided(self, i: int) -> bool:
        """Whether step ``i`` is inside this row's guidance window (G runs, E is steered)."""
        return self.config.alpha > 0 and i < min(self.config.window, len(self.timesteps))

    @property
    def cfg_rows(self) -> int:
        return self.embeds.shape[0]


@dataclass
class StepStats:
    """What one :meth:`RowEngine.step` did: images per UNet call (CFG halves not counted twice) and
    its wall time split into the guidance part (G's passes, the steering gradient, G's share of a
    co-batched call, apportioned by rows) and the plain part (E's pass). On a GPU the parts are host
    times; the step's total is exact once the step's results are read."""

    calls: list[int] = field(default_factory=list)
    guidance_s: float = 0.0
    plain_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.guidance_s + self.plain_s


class RowEngine:
    """Advances rows of any subjects, each at its own step. Not thread-safe per base UNet.

    The UNet specifics sit in a few methods (``_call``, ``_recording``, ``layers``, ``_ddim``,
    ``_row``, ``decode``) that ``method/flow_rows.py`` overrides for the flow-matching families."""

    flow = False

    def __init__(self, components: Components, co_batch: bool = True, adapter_method: str = "gather",
                 co_batch_limit: int | None = None):
        if adapter_method not in METHODS:
            raise ValueError(f"adapter_method must be one of {METHODS}, got {adapter_method!r}")
        if components.model_family.flow_matching and not self.flow:
            raise ValueError(f"the flow-matching family {components.family!r} runs rows in "
                             "method.flow_rows.FlowRowEngine (method.flow_rows.row_engine picks it)")
        self.components = components
        self.table = None if self.flow else ddim.DDIMTable.of(components.scheduler.config)
        self.co_batch = co_batch
        if co_batch_limit is not None and co_batch_limit < 1:
            raise ValueError(f"co_batch_limit must be >= 1 image or None, got {co_batch_limit}")
        self.co_batch_limit = co_batch_limit  # the widest co-batched E call, in images (None: no limit)
        self.adapter_method = adapter_method
        self.device, self.dtype = components.device, components.denoiser.dtype  # fixed while serving; slow to ask
        self._timesteps_cache: dict[int, list[int]] = {}
        self._layers_cache: dict = {}
        self.recorder = Recorder()
        self.last_step = StepStats()  # filled by every step (the replica's metrics read it)

    # ------------------------------------------------------------------ rows in

    def start(self, request: RowRequest, tag=None) -> Row:
        """A new row at step 0 (its text encoded, its noise drawn from its seed)."""
        return self.start_many([request], [tag])[0]

    def start_many(self, requests: list[RowRequest], tags: list | None = None) -> list[Row]:
        """New rows at step 0: the text of rows with one shape and kind of negative prompt encoded
        in one call (a row's conditioning does not depend on its batch), each row's noise from its seed."""
        tags = [None] * len(requests) if tags is None else tags
        for request in requests:
            self._check(request)
        rows: list[Row | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for b, request in enumerate(requests):
            groups.setdefault(row_key(request.config, self.components)[:3] + (request.negative_prompt is None,),
                              []).append(b)
        for (height, width, do_cfg, no_negative), members in groups.items():
            batch = [requests[b] for b in members]
            negatives = None if no_negative else [request.negative_prompt for request in batch]
            cond = prompt_conditioning(self.components, [request.prompt for request in batch], negatives, do_cfg,
                                       height, width)
            for k, b in enumerate(members):
                rows[b] = self._row(requests[b], tags[b], cond, k, height, width)
        return rows

    def _check(self, request: RowRequest) -> None:
        config = request.config
        if not isinstance(config, SamplingConfig) or not config.row_batchable:
            raise ValueError("rows run a SamplingConfig without attention_maps or return_reference")
        if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {request.seed!r}")
        factor = self.components.vae_scale_factor
        for name, value in zip(("height", "width"), row_key(config, self.components)[:2]):
            if value % factor:
                raise ValueError(f"{name} must be divisible by the VAE factor {factor}, got {value}")

    def _row(self, request: RowRequest, tag, cond, k: int, height: int, width: int) -> Row:
        """Row ``k`` of a batch's conditioning ``cond`` as a Row of its own."""
        c, n = self.components, cond.batch
        parts = [slice(k, k + 1)] if not cond.do_cfg else [slice(k, k + 1), slice(n + k, n + k + 1)]
        embeds = torch.cat([cond.embeds[part] for part in parts])
        added = None if cond.added_cond_kwargs is None else {
            key: torch.cat([value[part] for part in parts]) for key, value in cond.added_cond_kwargs.items()}
        input_ids = cond.input_ids[k:k + 1]
        mask = guidance.prompt_token_mask(input_ids, c.tokenizer.eos_token_id, request.config.token_indices)
        shape = (1, c.unet.config.in_channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
        z = initial_latents([request.seed], shape, self.device, self.dtype)
        return Row(request, self.timesteps(request.config.num_inference_steps), z, z.clone(), embeds, added, mask, tag)

    def layers(self, selection) -> list:
        """The UNet's cross-attention layers ``selection`` names (cached: every guided step asks)."""
        if selection not in self._layers_cache:
            self._layers_cache[selection] = select_layers(self.components.unet, selection)
        return self._layers_cache[selection]

    def timesteps(self, steps: int) -> list[int]:
        """The DDIM timesteps of a ``steps``-step schedule (cached: every row asks)."""
        if steps not in self._timesteps_cache:
            self._timesteps_cache[steps] = ddim.timesteps(self.components.scheduler.config, steps)
        return self._timesteps_cache[steps]

    # ------------------------------------------------------------------ one step of every row

    @torch.no_grad()
    def step(self, rows: list[Row], joining: list[Row] = ()) -> list[Row]:
        """Advance every row by one denoising step; returns the rows that finished.

        ``joining``: new rows (at step 0) that start next step. Co-batched, their G step 0 runs in
        this step's E call, so their first guided step needs no G pass of its own (one small UNet
        call saved per arrival); they are not advanced."""
        if not rows:
            return []
        if any(row.done for row in rows) or any(row.index for row in joining):
            raise ValueError("a finished row cannot take another step, and joining rows are at step 0")
        if len({row_key(row.config, self.components) for row in [*rows, *joining]}) != 1:
            raise ValueError("rows of one step must share a row_key (latent size, CFG, guidance layers)")
        guided = [row for row in rows if row.guided(row.index)]
        ahead = self._ahead(rows, joining)
        stats = self.last_step = StepStats()
        clock = time.perf_counter()
        with ExitStack() as stack:
            layers = None
            if guided or ahead:
                layers = self.layers(rows[0].config.layers)
                stack.enter_context(self._recording(layers, rows[0].config.layers))
            behind = [row for row in guided if row.g_index != row.index]
            if behind:  # G's step i not computed ahead (a row's first guided step, or no co_batch)
                self._guidance_pass(behind, [row.index for row in behind])
                stats.calls.append(len(behind))
            if guided:
                self._steer(guided, layers[-1].name)
                stats.calls.append(len(guided))
            stats.guidance_s, clock = time.perf_counter() - clock, time.perf_counter()
            self._edit_pass(rows, guided, ahead)
        edit_s, wide = time.perf_counter() - clock, len(rows) + len(ahead)
        stats.calls.append(wide)
        stats.guidance_s += edit_s * len(ahead) / wide
        stats.plain_s = edit_s * len(rows) / wide
        for row in rows:
            if not row.guided(row.index + 1):
                row.maps_g = {}  # G's maps are spent: free them now, not when the row finishes
            row.index += 1
        return [row for row in rows if row.done]

    def _ahead(self, rows: list[Row], joining) -> list[tuple[Row, int]]:
        """The (row, G's step) pairs that run inside E's call: each guided row's next G step and the
        joining rows' G step 0, when co-batching is on and the call stays within ``co_batch_limit``
        images (wider, it would only add memory: the separate G pass costs the same per image)."""
        if not self.co_batch:
            return []
        ahead = [(row, row.index + 1) for row in rows if row.guided(row.index + 1)]
        ahead += [(row, 0) for row in joining if row.guided(0)]
        limit = self.co_batch_limit
        return ahead if limit is None or len(rows) + len(ahead) <= limit else []

    def _guidance_pass(self, rows: list[Row], steps: list[int]) -> None:
        """G's step ``steps[b]`` for each row: its maps kept for the guidance, z_G moved on."""
        entries = [(row, row.request.guidance_adapter, row.z_g, i) for row, i in zip(rows, steps)]
        eps, maps = self._predict(entries, record=True)
        self._advance_guidance(rows, steps, eps, maps)

    def _advance_guidance(self, rows, steps, eps, maps) -> None:
        z = self._ddim(torch.cat([row.z_g for row in rows]), eps, [row.timesteps[i] for row, i in zip(rows, steps)],
                       rows)
        for b, (row, i) in enumerate(zip(rows, steps)):
            row.z_g, row.g_index = z[b:b + 1], i
            row.maps_g = {name: value[b:b + 1] for name, value in maps.items()}

    def _steer(self, rows: list[Row], last_layer: str) -> None:
        """One attention-guidance step on the guided rows' E latents (gradient through E's cond branch)."""
        unet = self.components.denoiser
        z = torch.cat([row.z_e for row in rows]).detach().requires_grad_(True)
        maps_g = {name: torch.cat([row.maps_g[name] for row in rows]) for name in rows[0].maps_g}
        mask = torch.cat([row.mask for row in rows])
        embeds, added = self._conditioning(rows, cond_only=True)
        t = self._timesteps([row.timesteps[row.index] for row in rows], cfg=False)
        with torch.enable_grad(), per_row(unet, [row.request.edit_adapter for row in rows], self.adapter_method), \
                self.recorder.capture(rows=slice(None), keep_graph=True, stop_after=last_layer) as store:
            try:
                self._call(z, t, embeds, added, rows)
            except StopForward:
                pass  # the rest of the UNet does not affect the selected maps
            distance = guidance.attention_distance(store.maps, maps_g, mask, rows[0].config.distance)
            (grad,) = torch.autograd.grad(distance.sum(), z)
        strength = torch.tensor([row.config.alpha * guidance.step_size(
            row.config.eta_schedule, row.config.step_size, row.index, min(row.config.window, len(row.timesteps)))
            for row in rows], device=self.device)
        moved = guidance.latent_update(z.detach(), grad, distance.detach(), strength, 1.0)
        for b, row in enumerate(rows):
            row.z_e = moved[b:b + 1]

    def _edit_pass(self, rows: list[Row], guided: list[Row], ahead: list[tuple[Row, int]]) -> None:
        """E's step for every row (and, co-batched, G's step ``i`` for each ``(row, i)`` of ``ahead``);
        z_E moved on."""
        entries = [(row, row.request.edit_adapter, row.z_e, row.index) for row in rows]
        entries += [(row, row.request.guidance_adapter, row.z_g, i) for row, i in ahead]
        eps, maps = self._predict(entries, record=bool(guided or ahead))
        n = len(rows)
        measured = {id(row) for row in guided}
        for b, row in enumerate(rows):
            if id(row) in measured:
                maps_e = {name: value[b:b + 1] for name, value in maps.items()}
                row.distances.append(float(guidance.attention_distance(
                    maps_e, row.maps_g, row.mask, row.config.distance)[0]))
        if ahead:
            self._advance_guidance([row for row, _ in ahead], [i for _, i in ahead], eps[n:],
                                   {name: value[n:] for name, value in maps.items()})
        z = self._ddim(torch.cat([row.z_e for row in rows]), eps[:n], [row.timesteps[row.index] for row in rows],
                       rows)
        for b, row in enumerate(rows):
            row.z_e = z[b:b + 1]

    # ------------------------------------------------------------------ model calls

    def _predict(self, entries, record: bool) -> tuple[torch.Tensor, dict]:
        """CFG noise predictions of ``entries`` (row, adapter, latents, step) in one UNet call, each
        row with its own adapter, timestep and scale; the cond branch's maps when ``record``."""
        rows = [row for row, *_ in entries]
        cfg = rows[0].cfg_rows == 2
        latents = torch.cat([z for _, _, z, _ in entries])
        names = [adapter for _, adapter, _, _ in entries]
        embeds, added = self._conditioning(rows, cond_only=False)
        t = self._timesteps([row.timesteps[i] for row, _, _, i in entries], cfg)
        model_input = torch.cat([latents, latents]) if cfg else latents
        with per_row(self.components.denoiser, names * 2 if cfg else names, self.adapter_method):
            if record:
                n = len(entries)
                with self.recorder.capture(rows=slice(n, 2 * n) if cfg else slice(0, n)) as store:
                    noise = self._call(model_input, t, embeds, added, rows * 2 if cfg else rows)
                maps = store.maps
            else:
                noise = self._call(model_input, t, embeds, added, rows * 2 if cfg else rows)
                maps = {}
        if not cfg:
            return noise, maps
        family = self.components.model_family
        scale = torch.tensor([family.cfg_scale(row.config) for row in rows], device=noise.device,
                             dtype=noise.dtype).view(-1, *[1] * (noise.dim() - 1))
        uncond, cond = noise.chunk(2)
        return uncond + scale * (cond - uncond), maps

    def _call(self, model_input, t, embeds, added, rows: list[Row]) -> torch.Tensor:
        """The UNet's prediction for ``model_input`` (``rows``: the row of each input row)."""
        return self.components.unet(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

    def _recording(self, layers, selection):
        """The context that records ``layers``' maps into ``self.recorder``."""
        return recording(self.components.unet, layers, self.recorder)

    def _conditioning(self, rows: list[Row], cond_only: bool) -> tuple[torch.Tensor, dict | None]:
        """The rows' text conditioning stacked as ``[uncond rows; cond rows]`` (or cond rows only)."""
        count = rows[0].cfg_rows
        parts = [slice(count - 1, count)] if cond_only else [slice(k, k + 1) for k in range(count)]
        embeds = torch.cat([row.embeds[part] for part in parts for row in rows])
        added = None
        if rows[0].added is not None:
            added = {key: torch.cat([row.added[key][part] for part in parts for row in rows])
                     for key in rows[0].added}
        return embeds, added

    def _timesteps(self, values: list[int], cfg: bool) -> torch.Tensor:
        t = torch.tensor(values, device=self.device, dtype=torch.long)
        return torch.cat([t, t]) if cfg else t

    def _ddim(self, z: torch.Tensor, eps: torch.Tensor, steps: list[int], rows: list[Row]) -> torch.Tensor:
        t = torch.tensor(steps, dtype=torch.long)
        lengths = torch.tensor([len(row.timesteps) for row in rows], dtype=torch.long)
        return ddim.step(self.table, eps, t, lengths, z)

    # ------------------------------------------------------------------ rows out

    @torch.no_grad()
    def decode(self, rows: list[Row]) -> np.ndarray:
        """The finished rows' images: ``(B, H, W, 3)`` float32 in [0, 1]."""
        latents = torch.cat([row.z_e for row in rows])
        return decode_latents(self.components, latents).permute(0, 2, 3, 1).cpu().numpy()

    def run(self, requests: list[RowRequest]) -> tuple[np.ndarray, list[Row]]:
        """All ``requests`` to the end together (they must share a row_key): images and rows."""
        rows = self.start_many(requests, list(range(len(requests))))
        active = list(rows)
        while active:
            self.step(active)
            active = [row for row in active if not row.done]
        return self.decode(rows), rows

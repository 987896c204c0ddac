"""Rows (method/rows.py): DreamBlend one sample at a time, in batches mixing subjects, settings and
steps, on per-row DDIM (method/ddim.py) and per-row LoRA adapters (method/row_adapters.py).

The properties are ARCHITECTURE.md's: per-row DDIM is diffusers' DDIMScheduler row by row; alpha = 0
is diffusers' pipeline; a row's image and attention distances are those the sampler gives its
request alone, whatever it is batched with and whenever it joined (batch invariance); only guided
rows are steered. Tiny models, few steps, one torch thread.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from peft import LoraConfig

from dreamblend_ray.config import MAX_SEED, LayerSelection, SamplingConfig
from dreamblend_ray.method import ddim
from dreamblend_ray.method.pair import AdapterPair, adapters_disabled
from dreamblend_ray.method.row_adapters import BASE, METHODS, lora_layers, per_row
from dreamblend_ray.method.rows import RowEngine, RowRequest
from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.models.components import build_tiny_components, default_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster under load

SUBJECTS = ("s1", "s2", "s3")
LORA = dict(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
LEVEL = 1 / 255  # one 8-bit level of an image in [0, 1]
SIZE = 16  # pixels: 8x8 latents, still two cross-attention resolutions to guide (the tiny model's default is 32)


def _config(steps: int, **kw) -> SamplingConfig:
    kw.setdefault("height", SIZE)
    kw.setdefault("width", SIZE)
    return SamplingConfig(num_inference_steps=steps, **kw)


# Three subjects (a G and an E adapter each) and an identical pair, with their own steps, windows,
# strengths, CFG scales, seeds and a negative prompt. One CFG key, so they can share every step.
REQUESTS = (
    RowRequest("a photo of sks dog on the beach", 1,
               _config(4, alpha=0.5, step_size=5.0, guidance_steps=2), "s1_g", "s1_e"),
    RowRequest("a red cat in the snow", 2,
               _config(5, alpha=0.3, step_size=3.0, guidance_steps=3, guidance_scale=5.0, eta_schedule="constant"),
               "s2_g", "s2_e", negative_prompt="blue"),
    RowRequest("a toy", 3, _config(3, alpha=0.0, guidance_scale=2.0), "s3_g", "s3_e"),
    RowRequest("a toy on a table", 4, _config(4, alpha=0.4, step_size=5.0, guidance_steps=4), "s1_e", "s1_e"),
)


@pytest.fixture(scope="module")
def components():
    """The tiny model with a G and an E LoRA adapter per subject, random nonzero weights."""
    c = build_tiny_components(seed=0)
    for k, name in enumerate(f"{subject}_{role}" for subject in SUBJECTS for role in ("g", "e")):
        c.unet.add_adapter(LoraConfig(**LORA), adapter_name=name)
        generator = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for pname, param in c.unet.named_parameters():
                if "lora_B" in pname and f".{name}." in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    c.unet.requires_grad_(False)
    return c


@pytest.fixture(scope="module")
def alone(components):
    """Each request of REQUESTS sampled alone by DreamBlendSampler with its AdapterPair."""
    sampler = DreamBlendSampler(components)
    return [sampler.sample(AdapterPair(components.unet, r.guidance_adapter, r.edit_adapter), [r.prompt], [r.seed],
                           r.config, None if r.negative_prompt is None else [r.negative_prompt])
            for r in REQUESTS]


def _scheduler(**overrides) -> DDIMScheduler:
    """SD's DDIM with ``overrides`` (the config's ``_use_default_values`` would undo those it lists)."""
    config = {key: value for key, value in default_scheduler().config.items() if key != "_use_default_values"}
    scheduler = DDIMScheduler.from_config({**config, **overrides})
    assert all(scheduler.config[key] == value for key, value in overrides.items())
    return scheduler


def _assert_as_alone(image, distances, reference):
    """A row's image within one 8-bit level of its request sampled alone, and the same distances."""
    assert np.abs(image - reference.arrays[0]).max() <= LEVEL
    torch.testing.assert_close(torch.tensor(distances, dtype=torch.float32).view(1, -1),
                               reference.attention_distance.float(), atol=1e-5, rtol=1e-4)


class UNetCalls:
    """Counts the UNet's forward calls and keeps each call's input latents (a forward pre-hook)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls.append((sample.detach().clone(), sample.requires_grad))

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


# ------------------------------------------------------------------------------- ddim.py

SCHEDULERS = {
    "epsilon": {},
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample"),
    "clip_sample": dict(clip_sample=True, clip_sample_range=0.5),
    "alpha_one_trailing": dict(set_alpha_to_one=True, timestep_spacing="trailing"),
}


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_ddim_step_matches_diffusers_step_by_step(kind):
    scheduler = _scheduler(**SCHEDULERS[kind])
    table = ddim.DDIMTable.of(scheduler.config)
    generator = torch.Generator().manual_seed(0)
    for steps in (1, 4, 7):
        scheduler.set_timesteps(steps)
        assert ddim.timesteps(scheduler.config, steps) == scheduler.timesteps.tolist()
        sample = torch.randn(2, 4, 8, 8, generator=generator)
        for t in ddim.timesteps(scheduler.config, steps):
            output = torch.randn(2, 4, 8, 8, generator=generator)
            expected = scheduler.step(output, t, sample).prev_sample
            got = ddim.step(table, output, torch.tensor([t, t]), torch.tensor([steps, steps]), sample)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
            sample = expected


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "clip_sample"])
def test_ddim_step_gives_each_row_its_own_timestep_and_schedule(kind):
    config = _scheduler(**SCHEDULERS[kind]).config
    table = ddim.DDIMTable.of(config)
    rows = [(4, 0), (7, 3), (10, 9), (50, 20), (1, 0)]  # (num_inference_steps, step index); 9 and 0 are last
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(len(rows), 4, 8, 8, generator=generator)
    output = torch.randn(len(rows), 4, 8, 8, generator=generator)
    t = torch.tensor([ddim.timesteps(config, steps)[i] for steps, i in rows])
    got = ddim.step(table, output, t, torch.tensor([steps for steps, _ in rows]), sample)
    for b, (steps, _) in enumerate(rows):
        scheduler = DDIMScheduler.from_config(config)
        scheduler.set_timesteps(steps)
        expected = scheduler.step(output[b:b + 1], int(t[b]), sample[b:b + 1]).prev_sample
        torch.testing.assert_close(got[b:b + 1], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_are_the_schedulers(spacing):
    for steps in (1, 7, 30, 50):
        scheduler = _scheduler(timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        assert ddim.timesteps(scheduler.config, steps) == scheduler.timesteps.tolist()


def test_ddim_table_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="thresholding"):
        ddim.DDIMTable.of(_scheduler(thresholding=True).config)
    with pytest.raises(ValueError, match="flow"):
        ddim.DDIMTable.of(_scheduler(prediction_type="flow").config)


# ------------------------------------------------------------------------------- row_adapters.py

def _unet_inputs(unet, batch: int):
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(batch, unet.config.in_channels, 16, 16, generator=generator)
    embeds = torch.randn(batch, 8, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([900, 500, 100, 700][:batch]), embeds


@torch.no_grad()
def _alone(unet, name, latents, t, embeds):
    """One UNet call with ``name`` active the ordinary way (BASE: adapters disabled)."""
    if name == BASE:
        with adapters_disabled(unet):
            return unet(latents, t, encoder_hidden_states=embeds).sample
    unet.set_adapter(name)
    unet.requires_grad_(False)
    return unet(latents, t, encoder_hidden_states=embeds).sample


@pytest.mark.parametrize("method", METHODS)
def test_per_row_gives_each_row_its_adapter_in_one_call(components, method):
    unet = components.unet
    names = ["s1_e", "s2_e", BASE]
    latents, t, embeds = _unet_inputs(unet, 3)
    with torch.no_grad(), per_row(unet, names, method), UNetCalls(unet) as seen:
        mixed = unet(latents, t, encoder_hidden_states=embeds).sample
    assert len(seen.calls) == 1
    for b, name in enumerate(names):
        expected = _alone(unet, name, latents[b:b + 1], t[b:b + 1], embeds[b:b + 1])
        assert (mixed[b:b + 1] - expected).abs().max() < 1e-5, name
    # the adapters matter: row 0 under another adapter, or none, is another output
    for other in ("s2_e", BASE):
        assert (mixed[:1] - _alone(unet, other, latents[:1], t[:1], embeds[:1])).abs().max() > 1e-3


def test_gathered_adapters_of_different_ranks_equal_peft_s_and_each_alone(components):
    unet = components.unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_v"]), adapter_name="rank2")
    try:
        with torch.no_grad():
            for pname, param in unet.named_parameters():
                if "lora_B" in pname and ".rank2." in pname:
                    param.normal_(0, 0.3)
        unet.requires_grad_(False)
        names = ["rank2", "s1_e", BASE, "rank2"]
        latents, t, embeds = _unet_inputs(unet, 4)
        with torch.no_grad():
            with per_row(unet, names, "gather"):
                gathered = unet(latents, t, encoder_hidden_states=embeds).sample
            with per_row(unet, names, "peft"):
                mixed = unet(latents, t, encoder_hidden_states=embeds).sample
        assert (gathered - mixed).abs().max() < 1e-5
        for b, name in enumerate(names):
            expected = _alone(unet, name, latents[b:b + 1], t[b:b + 1], embeds[b:b + 1])
            assert (gathered[b:b + 1] - expected).abs().max() < 1e-5, name
        with pytest.raises(ValueError, match="method"), per_row(unet, names, "punica"):
            pass
    finally:
        unet.delete_adapters("rank2")


def test_per_row_leaves_no_hooks_behind(components):
    unet = components.unet
    latents, t, embeds = _unet_inputs(unet, 2)
    with pytest.raises(RuntimeError, match="inside"), per_row(unet, ["s1_e", "s2_e"]):
        raise RuntimeError("inside")
    with per_row(unet, ["s1_e", "s2_e"]):
        pass
    assert all(not layer._forward_pre_hooks for layer in lora_layers(unet))
    unet.set_adapter("s2_e")  # a plain call after the block uses the active adapter on every row
    unet.requires_grad_(False)
    with torch.no_grad():
        plain = unet(latents, t, encoder_hidden_states=embeds).sample
    expected = _alone(unet, "s2_e", latents[:1], t[:1], embeds[:1])
    assert (plain[:1] - expected).abs().max() < 1e-5


def test_per_row_names_what_it_cannot_apply(components, tiny_components):
    unet = components.unet
    with pytest.raises(ValueError, match="nope"), per_row(unet, ["s1_e", "nope", BASE]):
        pass
    assert all(not layer._forward_pre_hooks for layer in lora_layers(unet))
    latents, t, embeds = _unet_inputs(unet, 2)
    with pytest.raises(ValueError, match="adapter_names"), torch.no_grad(), per_row(unet, ["s1_e"]):
        unet(latents, t, encoder_hidden_states=embeds)  # one name for two rows
    with pytest.raises(ValueError, match="s1_e"), per_row(tiny_components.unet, [BASE, "s1_e"]):
        pass  # a UNet without adapters has none of them
    plain_unet = tiny_components.unet
    with torch.no_grad():
        plain = plain_unet(latents, t, encoder_hidden_states=embeds).sample
        with per_row(plain_unet, [BASE, BASE]):  # ...and its BASE rows are plain calls
            assert torch.equal(plain_unet(latents, t, encoder_hidden_states=embeds).sample, plain)


# ------------------------------------------------------------------------------- rows.py: batch invariance

# UNet calls per step of REQUESTS run together: G's pass, the gradient pass, E's pass while any row
# is guided; co-batched, G's next step rides in E's call, so only the first guided step needs three.
CALLS_PER_STEP = {True: [3, 2, 2, 2, 1], False: [3, 3, 3, 3, 1]}


@pytest.mark.parametrize("co_batch, method", [(True, "peft"), (False, "peft"), (True, "gather")])
def test_mixed_batch_gives_each_row_its_image_alone(components, alone, co_batch, method):
    engine = RowEngine(components, co_batch=co_batch, adapter_method=method)
    rows = [engine.start(request, tag=b) for b, request in enumerate(REQUESTS)]
    active, calls, finished = list(rows), [], []
    with UNetCalls(components.unet) as seen:
        while active:
            before = len(seen.calls)
            finished.append(sorted(row.tag for row in engine.step(active)))
            calls.append(len(seen.calls) - before)
            active = [row for row in active if not row.done]
    assert calls == CALLS_PER_STEP[co_batch]  # every call is shared by all rows that need it
    assert finished == [[], [], [2], [0, 3], [1]]
    images = engine.decode(rows)
    for row, image, reference in zip(rows, images, alone):
        assert len(row.distances) == (row.config.window if row.config.alpha > 0 else 0)
        _assert_as_alone(image, row.distances, reference)
    assert max(rows[3].distances) < 1e-5  # G = E: nothing to steer toward


def test_rows_join_between_steps_and_leave_when_done(components, alone):
    engine = RowEngine(components, co_batch=True)
    active = [engine.start(REQUESTS[0], tag=0), engine.start(REQUESTS[1], tag=1)]
    images, finished_at, step = {}, {}, 0
    while active:
        if step == 2:  # two rows join half-way through the first two
            active += [engine.start(REQUESTS[2], tag=2), engine.start(REQUESTS[3], tag=3)]
        finished = engine.step(active)
        step += 1
        assert all(row.done for row in finished)
        assert not any(row.done for row in active if row not in finished)
        for row, image in zip(finished, engine.decode(finished) if finished else []):
            finished_at[row.tag], images[row.tag] = step, (image, row.distances)
        active = [row for row in active if row not in finished]
    assert finished_at == {0: 4, 1: 5, 2: 5, 3: 6}
    for tag, (image, distances) in images.items():
        _assert_as_alone(image, distances, alone[tag])


def test_guided_rows_without_cfg_give_their_images_alone(components):
    """CFG off (scale <= 1): one text row per sample; token choice and eta schedule per row."""
    requests = [RowRequest("a red cat", 8,
                           _config(4, alpha=0.5, step_size=5.0, guidance_steps=3, guidance_scale=1.0), "s2_g", "s2_e"),
                RowRequest("a dog", 9, _config(3, alpha=0.3, step_size=5.0, guidance_steps=2, guidance_scale=0.5,
                                               eta_schedule="cosine", token_indices=(1,)), "s1_g", "s1_e")]
    images, rows = RowEngine(components).run(requests)
    sampler = DreamBlendSampler(components)
    for request, image, row in zip(requests, images, rows):
        reference = sampler.sample(AdapterPair(components.unet, request.guidance_adapter, request.edit_adapter),
                                   [request.prompt], [request.seed], request.config)
        _assert_as_alone(image, row.distances, reference)


# ------------------------------------------------------------------------------- rows.py: alpha = 0 is diffusers

def _pipeline(c):
    if c.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                         tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                         scheduler=c.scheduler, force_zeros_for_empty_prompt=True)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                       scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(c, request: RowRequest) -> np.ndarray:
    """The family's diffusers pipeline on the request's E (its adapter active, or none)."""
    config, name = request.config, request.edit_adapter
    with adapters_disabled(c.unet) if name == BASE else AdapterPair(c.unet, name, name).edit():
        return _pipeline(c)(request.prompt, negative_prompt=request.negative_prompt, height=config.height,
                            width=config.width, num_inference_steps=config.num_inference_steps,
                            guidance_scale=config.guidance_scale,
                            generator=torch.Generator().manual_seed(request.seed), output_type="np").images[0]


# Per case: a base model (None: the one with the subjects' adapters) and rows run together; those with
# alpha = 0, or G = E, must be the family's diffusers pipeline on E.
DIFFUSERS_CASES = {
    "tiny": (None, [RowRequest("a photo of sks dog", 7, _config(4, alpha=0.0)),
                    RowRequest("a red cat", 8, _config(3, alpha=0.0, guidance_scale=5.0), "s2_g", "s2_e",
                               negative_prompt="a cat"),
                    REQUESTS[0]]),
    "tiny-no-cfg": (None, [RowRequest("a photo of sks dog", 7, _config(4, alpha=0.0, guidance_scale=1.0)),
                           RowRequest("a red cat", 8, _config(3, alpha=0.0, guidance_scale=1.0), "s3_g", "s3_e")]),
    "tiny-sd2": ("tiny-sd2", [RowRequest("a photo of sks dog", 7, _config(4, alpha=0.0)),
                              RowRequest("a red cat", 8, _config(3, alpha=0.0, guidance_scale=1.5),
                                         negative_prompt="a cat")]),
    "tiny-sdxl": ("tiny-sdxl", [RowRequest("a photo of sks dog", 7, _config(4, alpha=0.0)),
                                RowRequest("a red cat", 8, _config(3, alpha=0.5, step_size=5.0, guidance_steps=2,
                                                                   guidance_scale=4.0), negative_prompt="a cat")]),
}


@pytest.mark.parametrize("case", DIFFUSERS_CASES)
def test_alpha_zero_rows_are_diffusers_pipeline(components, case):
    model, requests = DIFFUSERS_CASES[case]
    c = components if model is None else build_tiny_components(seed=0, name=model)
    images, _ = RowEngine(c).run(requests)
    compared = [request for request in requests
                if request.config.alpha == 0 or request.guidance_adapter == request.edit_adapter]
    assert len(compared) >= 2
    for request, image in zip(requests, images):
        if request in compared:
            assert np.abs(image - _diffusers(c, request)).max() < 1e-4, request


# ------------------------------------------------------------------------------- rows.py: guidance and edges

def test_only_guided_rows_are_steered(components):
    """In one step the gradient call holds the guided rows only; it moves them as it moves each alone
    and leaves the alpha = 0 row's latents exactly as they were."""
    engine = RowEngine(components)
    batch = [engine.start(REQUESTS[b]) for b in (0, 2, 3)]  # guided, alpha = 0, guided with G = E
    single = engine.start(REQUESTS[0])
    start = [row.z_e.clone() for row in batch]
    with UNetCalls(components.unet) as seen:
        engine.step(batch)
        engine.step([single])
    grad_calls = [(k, sample) for k, (sample, grad) in enumerate(seen.calls) if grad]
    assert [sample.shape[0] for _, sample in grad_calls] == [2, 1]
    assert torch.equal(grad_calls[0][1], torch.cat([start[0], start[2]]))
    steered = seen.calls[grad_calls[0][0] + 1][0]  # E's call right after: the steered latents first
    steered_alone = seen.calls[grad_calls[1][0] + 1][0]
    assert (steered[0] - start[0][0]).abs().max() > 1e-2  # the guided row moved...
    torch.testing.assert_close(steered[0], steered_alone[0], atol=1e-5, rtol=1e-4)  # ...as it moves alone
    assert torch.equal(steered[1], start[1][0])  # alpha = 0: untouched
    assert (steered[2] - start[2][0]).abs().max() < 1e-5  # G = E: distance ~0, no move


@pytest.mark.parametrize("change", [dict(guidance_scale=1.0), dict(height=2 * SIZE),
                                    dict(layers=LayerSelection(num_lowest=1))])
def test_rows_of_different_keys_cannot_share_a_step(components, change):
    engine = RowEngine(components)
    rows = [engine.start(REQUESTS[2]), engine.start(RowRequest("a toy", 5, _config(3, alpha=0.0, **change)))]
    with pytest.raises(ValueError, match="row_key"):
        engine.step(rows)
    assert [row.index for row in rows] == [0, 0]


@pytest.mark.parametrize("seed,config,message", [
    (1, _config(3, attention_maps=True), "attention_maps"),
    (1, _config(3, return_reference=True), "return_reference"),
    (1, {"alpha": 0.0}, "SamplingConfig"),
    (1, _config(3, height=33), "divisible by the VAE factor"),
    (-1, _config(3), "seed"),
    (MAX_SEED + 1, _config(3), "seed"),
    (1.5, _config(3), "seed"),
    (True, _config(3), "seed"),
    ("3", _config(3), "seed"),
])
def test_start_rejects_what_rows_cannot_run(components, seed, config, message):
    with pytest.raises(ValueError, match=message):
        RowEngine(components).start(RowRequest("a toy", seed, config))


# ------------------------------------------------------------------------------- joining and the co-batch limit (issue 33)

def test_joining_rows_take_g_step_0_in_the_running_call_and_still_match_alone(components, alone):
    """A row that joins running rows has its G step 0 computed inside their E call: its first guided
    step runs no G pass of its own, and its image and distances are those it gets alone."""
    engine = RowEngine(components, co_batch=True)
    first, late = engine.start(REQUESTS[0]), engine.start(REQUESTS[3])
    engine.step([first])
    with UNetCalls(components.unet) as counted:
        engine.step([first], joining=[late])
    assert late.index == 0 and late.g_index == 0  # its G step 0 is done, its E step not yet
    assert len(counted.calls) == 2  # steer + one E call carrying first's G step 2 and late's G step 0
    with UNetCalls(components.unet) as counted:
        engine.step([first, late])
    assert len(counted.calls) == 2  # no G pass for the newcomer's first guided step
    active = [first, late]
    while active:
        engine.step(active)
        active = [row for row in active if not row.done]
    images = engine.decode([first, late])
    _assert_as_alone(images[0:1], first.distances, alone[0])
    _assert_as_alone(images[1:2], late.distances, alone[3])


def test_co_batching_stops_when_the_call_would_exceed_its_limit(components, alone):
    """With ``co_batch_limit`` images, G's rows join E's call only while the call stays that narrow;
    wider, G runs its own pass (no call is ever wider than the limit) and the images do not change."""
    wide = [REQUESTS[0], REQUESTS[1], REQUESTS[3]]
    engine = RowEngine(components, co_batch=True, co_batch_limit=4)
    rows = engine.start_many(wide)
    with UNetCalls(components.unet) as counted:
        active = list(rows)
        while active:
            engine.step(active)
            assert max(engine.last_step.calls) <= 4
            active = [row for row in active if not row.done]
    cfg_rows = [sample.shape[0] // 2 for sample, grad in counted.calls if not grad]
    assert max(cfg_rows) <= 4
    images = engine.decode(rows)
    for k, index in enumerate((0, 1, 3)):
        _assert_as_alone(images[k:k + 1], rows[k].distances, alone[index])
    with pytest.raises(ValueError, match="co_batch_limit"):
        RowEngine(components, co_batch_limit=0)

"""Flux and SD3 behind the family seam (models/flux.py, models/sd3.py) and DreamBlend's flow
sampler (method/flow_sampler.py): prompt encoding and alpha = 0 sampling equal FluxPipeline's and
StableDiffusion3Pipeline's, G = E is plain sampling, batch invariance, save -> load keeps the family."""

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method.pair import TwoUNetPair, single
from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.models import families
from dreamblend_ray.models.components import build_tiny_components, load_components, model_identity, save_components
from dreamblend_ray.models.flux import Flux

STEPS = 4
PROMPTS = ["a photo of sks dog on the beach", "a red cat in the snow", "a toy"]
KINDS = ["tiny-flux", "tiny-sd3"]


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def components(kind):
    return build_tiny_components(seed=0, name=kind)


@pytest.fixture(scope="module")
def other(kind):
    return build_tiny_components(seed=1, name=kind).transformer


def _config(**kw):
    kw.setdefault("num_inference_steps", STEPS)
    return SamplingConfig(**kw)


def pipeline(c):
    parts = dict(scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                 text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, transformer=c.transformer)
    if c.family == "flux":
        pipe = FluxPipeline(**parts)
    else:
        pipe = StableDiffusion3Pipeline(text_encoder_3=c.text_encoder_3, tokenizer_3=c.tokenizer_3, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_length(c):
    return c.model_family.sequence_length(c)


def test_the_tiny_models_are_their_families(components, kind):
    assert components.family == {"tiny-flux": "flux", "tiny-sd3": "sd3"}[kind]
    assert components.unet is None and components.denoiser is components.transformer
    assert components.default_size == 32
    assert components.vae.config.shift_factor != 0


def test_prompt_encoding_is_the_pipelines(components):
    c = components
    text = c.model_family.encode(c, PROMPTS[:2])
    if c.family == "flux":
        embeds, pooled, _ = pipeline(c).encode_prompt(PROMPTS[:2], max_sequence_length=max_length(c))
    else:
        embeds, _, pooled, _ = pipeline(c).encode_prompt(PROMPTS[:2], None, None, do_classifier_free_guidance=False,
                                                         max_sequence_length=max_length(c))
    assert torch.equal(text.embeds, embeds) and torch.equal(text.pooled, pooled)
    assert text.input_ids.shape == text.embeds.shape[:2]


def test_the_token_mask_is_t5s_prompt_without_a_start_token(components):
    c = components
    text = c.model_family.encode(c, ["a photo of sks dog", "a cat"])
    mask = c.model_family.token_mask(c, text.input_ids)
    assert mask.sum(1).tolist() == [5, 2]  # every word is one T5 token; </s> and padding excluded
    offset = c.model_family.text_offset(c)
    assert not mask[:, :offset].any() and mask[:, offset].all()
    only_dog = c.model_family.token_mask(c, text.input_ids, (5,))
    assert only_dog.sum().item() == 1 and only_dog[0, offset + 4]


@pytest.mark.parametrize("scale,negative,true_cfg", [(3.5, None, 1.0), (5.0, "a cat", 4.0), (1.0, None, 1.0),
                                                     (3.5, None, 2.5)])
def test_alpha_zero_matches_the_familys_diffusers_pipeline(components, other, scale, negative, true_cfg):
    """SD3: CFG at guidance_scale. Flux: guidance_scale is the embedded guidance, and CFG runs with
    true_cfg_scale > 1 (FluxPipeline's true CFG), against the given negative prompt or the empty one."""
    c = components
    sample = functools.partial(DreamBlendSampler(c).sample, TwoUNetPair(other, c.transformer), PROMPTS[:2], [7, 8])
    negatives = None if negative is None else [negative] * 2
    if c.family != "flux" and true_cfg != 1.0:
        with pytest.raises(ValueError, match="true_cfg_scale is FLUX.1's"):  # SD3's CFG scale is guidance_scale
            sample(_config(alpha=0.0, guidance_scale=scale, true_cfg_scale=true_cfg), negatives)
        return
    flux_true_cfg = {"true_cfg_scale": true_cfg} if c.family == "flux" else {}
    result = sample(_config(alpha=0.0, guidance_scale=scale, **flux_true_cfg), negatives)
    generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
    kwargs = {} if negative is None else {"negative_prompt": [negative] * 2}
    if flux_true_cfg.get("true_cfg_scale", 1.0) > 1.0:
        kwargs = {"negative_prompt": [negative or ""] * 2, **flux_true_cfg}  # the pipeline skips CFG without one
    expected = pipeline(c)(PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=scale, height=32, width=32,
                           generator=generators, output_type="np", max_sequence_length=max_length(c),
                           **kwargs).images
    assert np.abs(result.arrays - expected).max() < 1e-4


def test_flux_true_cfg_changes_the_image_and_a_negative_prompt_needs_it():
    c = build_tiny_components(name="tiny-flux")
    sampler, pair = DreamBlendSampler(c), single(c.transformer)
    plain = sampler.sample(pair, PROMPTS[:1], [1], _config()).arrays
    cfg = sampler.sample(pair, PROMPTS[:1], [1], _config(true_cfg_scale=4.0), ["a cat"]).arrays
    assert np.abs(plain - cfg).max() > 1e-3
    with pytest.raises(ValueError, match="true_cfg_scale > 1"):
        sampler.sample(pair, PROMPTS[:1], [1], _config(), ["a cat"])


def test_true_cfg_scale_is_refused_by_the_unet_families():
    c = build_tiny_components(name="tiny")
    pair = single(c.denoiser)
    with pytest.raises(ValueError, match="true_cfg_scale is FLUX.1's"):
        DreamBlendSampler(c).sample(pair, PROMPTS[:1], [1], _config(true_cfg_scale=2.0))


def test_identical_g_and_e_is_plain_sampling(components):
    c = components
    guided = DreamBlendSampler(c).sample(single(c.transformer), PROMPTS[:2], [1, 2],
                                         _config(alpha=0.5, step_size=5.0, guidance_steps=STEPS))
    plain = DreamBlendSampler(c).sample(single(c.transformer), PROMPTS[:2], [1, 2], _config(alpha=0.0))
    assert guided.attention_distance.abs().max() < 1e-5
    assert np.abs(guided.arrays - plain.arrays).max() < 1e-4


def test_guidance_lowers_the_distance(components, other):
    c = components
    pair = TwoUNetPair(other, c.transformer)
    base = DreamBlendSampler(c).sample(pair, PROMPTS, [11, 12, 13], _config(alpha=0.0), track_distance=True)
    guided = DreamBlendSampler(c).sample(pair, PROMPTS, [11, 12, 13], _config(alpha=0.5, step_size=5.0))
    assert (guided.attention_distance.mean(1) < base.attention_distance.mean(1)).all()


def test_batch_invariance(components, other):
    c = components
    pair = TwoUNetPair(other, c.transformer)
    config = _config(alpha=0.3, step_size=3.0, return_reference=True)
    batch = DreamBlendSampler(c).sample(pair, PROMPTS, [5, 6, 7], config)
    alone = DreamBlendSampler(c).sample(pair, [PROMPTS[1]], [6], config)
    assert np.abs(batch.arrays[1] - alone.arrays[0]).max() < 1e-4
    assert np.abs(batch.reference_arrays[1] - alone.reference_arrays[0]).max() < 1e-4


def test_save_and_load_keep_the_family_and_the_outputs(components, tmp_path):
    c = components
    save_components(c, tmp_path / "base")
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    assert index["_class_name"] == c.model_family.pipeline_class
    loaded = load_components(str(tmp_path / "base"))
    assert loaded.family == c.family
    assert model_identity(loaded)["config_sha256"] == model_identity(c)["config_sha256"]
    config = _config(alpha=0.0, height=32, width=32)
    a = DreamBlendSampler(c).sample(single(c.transformer), [PROMPTS[2]], [3], config)
    b = DreamBlendSampler(loaded).sample(single(loaded.transformer), [PROMPTS[2]], [3], config)
    assert np.abs(a.arrays - b.arrays).max() < 1e-5
    pipe_class = FluxPipeline if c.family == "flux" else StableDiffusion3Pipeline
    pipe = pipe_class.from_pretrained(tmp_path / "base", local_files_only=True)  # diffusers reads our folder
    assert type(pipe.transformer) is type(c.transformer)


def test_packing_is_the_pipelines():
    latents = torch.randn(2, 4, 16, 8)
    packed = Flux.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 16, 8))
    assert torch.equal(Flux.unpack(packed, 16, 8), latents)
    ids = Flux.image_ids(16, 8, "cpu", torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 8, 4, "cpu", torch.float32))


def test_family_detection():
    assert families.detect({"_class_name": "FluxPipeline"}).name == "flux"
    assert families.detect({"_class_name": "StableDiffusion3Pipeline"}).name == "sd3"


def test_sizes_off_the_packing_grid_are_refused():
    c = build_tiny_components(name="tiny-flux")
    with pytest.raises(ValueError, match="divisible by 4"):
        DreamBlendSampler(c).sample(single(c.transformer), PROMPTS[:1], [1], _config(height=34, width=32))


@pytest.mark.parametrize("name, t5", [("tiny-flux", "text_encoder_2"), ("tiny-sd3", "text_encoder_3")])
def test_an_offloaded_t5_visits_the_device_for_each_encoding_only(name, t5, monkeypatch):
    """On a GPU T5 stays on the CPU between encodings (test_gpu.py checks the devices); here the
    visit itself: T5 moved to the denoiser's device, then back to the CPU, and the same text."""
    assert load_components(name).offloaded == ()  # off on a CPU by default
    resident, offloaded = load_components(name), load_components(name, offload_t5=True)
    assert offloaded.offloaded == (t5,) and load_components("tiny", offload_t5=True).offloaded == ()
    moves = []
    encoder = getattr(offloaded, t5)
    original = encoder.to

    def recording_to(*args, **kwargs):
        moves.append(args[0] if args else kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "to", recording_to)
    expected = resident.model_family.encode(resident, PROMPTS)
    got = offloaded.model_family.encode(offloaded, PROMPTS)
    assert [str(m) for m in moves] == [str(offloaded.device), "cpu"]
    assert torch.equal(got.embeds, expected.embeds) and torch.equal(got.input_ids, expected.input_ids)
    offloaded.to("cpu", torch.bfloat16)  # the dtype reaches the offloaded part; it stays on the CPU
    assert next(encoder.parameters()).dtype == torch.bfloat16 and next(encoder.parameters()).device.type == "cpu"

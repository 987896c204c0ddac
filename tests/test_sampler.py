"""The properties of ARCHITECTURE.md ("Properties that must hold") on the tiny model."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method.pair import AdapterPair, TwoUNetPair, single
from dreamblend_ray.method.sampler import DreamBlendSampler, plain_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster under load

STEPS = 8
PROMPTS = ["a photo of sks dog on the beach", "a red cat in the snow", "a toy"]


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(seed=0)


@pytest.fixture(scope="module")
def other_unet():
    """A different UNet (another random seed) to play G: its maps differ from E's."""
    return build_tiny_components(seed=1).unet


@pytest.fixture(scope="module")
def sampler(components):
    return DreamBlendSampler(components)


def _config(**kw):
    kw.setdefault("num_inference_steps", STEPS)
    return SamplingConfig(**kw)


def _diffusers(components, prompt, seed, scale, negative=None):
    c = components
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                   unet=c.unet, scheduler=c.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=scale,
                generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("scale,negative", [(3.0, None), (5.0, "a cat"), (1.0, None)])
def test_alpha_zero_matches_diffusers_pipeline(components, sampler, other_unet, scale, negative):
    pair = TwoUNetPair(other_unet, components.unet)
    config = _config(alpha=0.0, guidance_scale=scale)
    result = sampler.sample(pair, [PROMPTS[0]], [7], config, None if negative is None else [negative])
    expected = _diffusers(components, PROMPTS[0], 7, scale, negative)
    assert np.abs(result.arrays[0] - expected).max() < 1e-4


def test_window_zero_is_plain_sampling(components, sampler, other_unet):
    guided = sampler.sample(TwoUNetPair(other_unet, components.unet), PROMPTS[:2], [1, 2],
                            _config(alpha=0.5, guidance_steps=0))
    plain = plain_sample(components, components.unet, PROMPTS[:2], [1, 2], STEPS, 3.0)
    assert np.abs(guided.arrays - plain.arrays).max() < 1e-5


def test_identical_g_and_e_is_plain_sampling(components, sampler):
    guided = sampler.sample(single(components.unet), PROMPTS[:2], [1, 2],
                            _config(alpha=0.5, step_size=5.0, guidance_steps=STEPS))
    plain = plain_sample(components, components.unet, PROMPTS[:2], [1, 2], STEPS, 3.0)
    assert guided.attention_distance.shape == (2, STEPS)
    assert guided.attention_distance.abs().max() < 1e-5
    assert np.abs(guided.arrays - plain.arrays).max() < 1e-4


def test_guidance_changes_the_image_and_lowers_the_distance(components, sampler, other_unet):
    pair = TwoUNetPair(other_unet, components.unet)
    seeds = [11, 12, 13]
    base = sampler.sample(pair, PROMPTS, seeds, _config(alpha=0.0), track_distance=True)
    guided = sampler.sample(pair, PROMPTS, seeds, _config(alpha=0.5, step_size=5.0))
    window = _config().window
    assert window > 0
    assert base.attention_distance.shape == guided.attention_distance.shape == (3, window)
    assert (guided.attention_distance.mean(1) < base.attention_distance.mean(1)).all()
    assert np.abs(guided.arrays - base.arrays).max() > 1e-3


def test_batch_invariance(components, sampler, other_unet):
    pair = TwoUNetPair(other_unet, components.unet)
    config = _config(alpha=0.3, step_size=3.0, return_reference=True)
    batch = sampler.sample(pair, PROMPTS, [5, 6, 7], config, negative_prompts=["", "blue", ""])
    alone = sampler.sample(pair, [PROMPTS[1]], [6], config, negative_prompts=["blue"])
    assert np.abs(batch.arrays[1] - alone.arrays[0]).max() < 1e-4
    assert np.abs(batch.reference_arrays[1] - alone.reference_arrays[0]).max() < 1e-4
    torch.testing.assert_close(batch.attention_distance[1:2], alone.attention_distance, atol=1e-5, rtol=1e-4)


def test_reference_image_is_plain_sampling_of_g(components, sampler, other_unet):
    result = sampler.sample(TwoUNetPair(other_unet, components.unet), [PROMPTS[2]], [3],
                            _config(alpha=0.4, return_reference=True))
    plain_g = plain_sample(components, other_unet, [PROMPTS[2]], [3], STEPS, 3.0)
    assert np.abs(result.reference_arrays - plain_g.arrays).max() < 1e-4
    assert result.reference_images[0].size == (32, 32)


def test_g_runs_only_while_needed(components, sampler, other_unet):
    calls = []
    handle = other_unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        pair = TwoUNetPair(other_unet, components.unet)
        sampler.sample(pair, [PROMPTS[0]], [0], _config(alpha=0.0))
        assert len(calls) == 0
        sampler.sample(pair, [PROMPTS[0]], [0], _config(alpha=0.3, guidance_steps=3))
        assert len(calls) == 3
        calls.clear()
        sampler.sample(pair, [PROMPTS[0]], [0], _config(alpha=0.0, return_reference=True))
        assert len(calls) == STEPS
    finally:
        handle.remove()


def test_adapter_pair_on_one_unet(sampler):
    components = build_tiny_components(seed=0)
    unet = components.unet
    lora = dict(r=4, lora_alpha=4, init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for name, seed in (("early", 1), ("late", 2)):
        unet.add_adapter(LoraConfig(**lora), adapter_name=name)
        torch.manual_seed(seed)
        with torch.no_grad():
            for pname, param in unet.named_parameters():
                if "lora_B" in pname and f".{name}." in pname:
                    param.normal_(0, 0.3)
    pair = AdapterPair(unet, "early", "late")
    own = DreamBlendSampler(components)
    plain = own.sample(pair, [PROMPTS[0]], [4], _config(alpha=0.0))
    unet.set_adapter("late")
    expected = plain_sample(components, unet, [PROMPTS[0]], [4], STEPS, 3.0)
    assert np.abs(plain.arrays - expected.arrays).max() < 1e-5
    base = own.sample(pair, [PROMPTS[0]], [4], _config(alpha=0.0), track_distance=True)
    guided = own.sample(pair, [PROMPTS[0]], [4], _config(alpha=0.5, step_size=5.0))
    assert guided.attention_distance.mean() < base.attention_distance.mean()
    with pytest.raises(ValueError, match="not loaded"):
        AdapterPair(unet, "early", "missing")


def test_callback_and_timing(components, sampler):
    seen = []
    result = sampler.sample(single(components.unet), [PROMPTS[0]], [0], _config(alpha=0.0),
                            callback=lambda step, total: seen.append((step, total)))
    assert seen == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert result.seconds > 0 and result.images[0].mode == "RGB"


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[], seeds=[]), "non-empty list"),
    (dict(prompts="a dog", seeds=[1]), "non-empty list"),
    (dict(prompts=["a", "b"], seeds=[1]), "one per prompt"),
    (dict(prompts=["a"], seeds=[-1]), "seeds must be integers"),
    (dict(prompts=["a"], seeds=[1.5]), "seeds must be integers"),
    (dict(prompts=["a"], seeds=[1], negative_prompts=["x", "y"]), "negative_prompts"),
    (dict(prompts=["a"], seeds=[1], config=SamplingConfig(height=33)), "divisible by the VAE factor"),
    (dict(prompts=["a"], seeds=[1], config={"alpha": 1}), "SamplingConfig"),
])
def test_bad_inputs(components, sampler, kwargs, message):
    kwargs.setdefault("config", _config())
    with pytest.raises(ValueError, match=message):
        sampler.sample(single(components.unet), **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(alpha=-0.5), "alpha"),
    (dict(num_inference_steps=10, guidance_steps=11), "guidance_steps"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)

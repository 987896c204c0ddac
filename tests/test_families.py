"""Every base-model family behind the one seam (models/families.py): the sampler's properties of
ARCHITECTURE.md hold on the tiny SD 2.x (v-prediction) and tiny SDXL models as on tiny SD 1.x."""

import json

import numpy as np
import pytest
import torch

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method.pair import TwoUNetPair, single
from dreamblend_ray.method.sampler import DreamBlendSampler, plain_sample
from dreamblend_ray.models import families
from dreamblend_ray.models.components import build_tiny_components, load_components, model_identity, save_components

STEPS = 6
PROMPTS = ["a photo of sks dog on the beach", "a red cat in the snow", "a toy"]
KINDS = ["tiny-sd2", "tiny-sdxl"]


SLOW = pytest.mark.slow


def kinds(*slow):
    """Both tiny families; those named in ``slow`` only in the full run (`-m slow`)."""
    return pytest.mark.parametrize("kind", [pytest.param(k, marks=SLOW) if k in slow else k for k in KINDS],
                                   indirect=True)


@pytest.fixture(scope="module")
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def components(kind):
    return build_tiny_components(seed=0, name=kind)


@pytest.fixture(scope="module")
def other_unet(kind):
    return build_tiny_components(seed=1, name=kind).unet


def _config(**kw):
    kw.setdefault("num_inference_steps", STEPS)
    return SamplingConfig(**kw)


def _pipeline(c):
    if c.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                         tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                         scheduler=c.scheduler, force_zeros_for_empty_prompt=True)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@kinds()
def test_the_tiny_models_are_their_families(components, kind):
    assert components.family == {"tiny-sd2": "sd", "tiny-sdxl": "sdxl"}[kind]
    if kind == "tiny-sd2":
        assert components.scheduler.config.prediction_type == "v_prediction"
    else:
        assert components.unet.config.addition_embed_type == "text_time"
        assert max(components.unet.config.transformer_layers_per_block) > 1


@kinds()
@pytest.mark.parametrize("scale,negative", [(3.0, None), (4.0, "a cat"), (1.0, None)])
def test_alpha_zero_matches_the_familys_diffusers_pipeline(components, other_unet, scale, negative):
    sampler = DreamBlendSampler(components)
    result = sampler.sample(TwoUNetPair(other_unet, components.unet), [PROMPTS[0]], [7],
                            _config(alpha=0.0, guidance_scale=scale), None if negative is None else [negative])
    pipe = _pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS[0], negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=scale,
                    height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert np.abs(result.arrays[0] - expected).max() < 1e-4


@kinds("tiny-sd2", "tiny-sdxl")
def test_identical_g_and_e_is_plain_sampling(components):
    sampler = DreamBlendSampler(components)
    guided = sampler.sample(single(components.unet), PROMPTS[:2], [1, 2],
                            _config(alpha=0.5, step_size=5.0, guidance_steps=STEPS))
    plain = plain_sample(components, components.unet, PROMPTS[:2], [1, 2], STEPS, 3.0)
    assert guided.attention_distance.abs().max() < 1e-5
    assert np.abs(guided.arrays - plain.arrays).max() < 1e-4


@kinds("tiny-sd2")
def test_guidance_lowers_the_distance(components, other_unet):
    sampler = DreamBlendSampler(components)
    pair = TwoUNetPair(other_unet, components.unet)
    base = sampler.sample(pair, PROMPTS, [11, 12, 13], _config(alpha=0.0), track_distance=True)
    guided = sampler.sample(pair, PROMPTS, [11, 12, 13], _config(alpha=0.5, step_size=5.0))
    assert (guided.attention_distance.mean(1) < base.attention_distance.mean(1)).all()


@kinds("tiny-sdxl")
def test_batch_invariance(components, other_unet):
    sampler = DreamBlendSampler(components)
    pair = TwoUNetPair(other_unet, components.unet)
    config = _config(alpha=0.3, step_size=3.0, return_reference=True)
    batch = sampler.sample(pair, PROMPTS, [5, 6, 7], config, negative_prompts=["", "blue", ""])
    alone = sampler.sample(pair, [PROMPTS[1]], [6], config, negative_prompts=["blue"])
    assert np.abs(batch.arrays[1] - alone.arrays[0]).max() < 1e-4
    assert np.abs(batch.reference_arrays[1] - alone.reference_arrays[0]).max() < 1e-4


@kinds("tiny-sdxl")
def test_save_and_load_keep_the_family_and_the_outputs(components, tmp_path):
    save_components(components, tmp_path / "base")
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    assert index["_class_name"] == components.model_family.pipeline_class
    loaded = load_components(str(tmp_path / "base"))
    assert loaded.family == components.family
    assert model_identity(loaded)["config_sha256"] == model_identity(components)["config_sha256"]
    config = _config(alpha=0.0)
    a = DreamBlendSampler(components).sample(single(components.unet), [PROMPTS[2]], [3], config)
    b = DreamBlendSampler(loaded).sample(single(loaded.unet), [PROMPTS[2]], [3], config)
    assert np.abs(a.arrays - b.arrays).max() < 1e-5


def test_family_detection_and_its_errors():
    assert families.detect({"_class_name": "StableDiffusionXLPipeline"}).name == "sdxl"
    assert families.detect({"_class_name": "StableDiffusionPipeline"}).name == "sd"
    assert families.detect({"_class_name": "JuggernautXLPipeline"}, override="sdxl").name == "sdxl"
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        families.detect({"_class_name": "KandinskyPipeline"})
    with pytest.raises(ValueError, match="model family must be one of"):
        families.get("kandinsky")


def test_the_families_differ_in_identity():
    sd2, sdxl = (model_identity(build_tiny_components(0, k)) for k in KINDS)
    assert (sd2["family"], sdxl["family"]) == ("sd", "sdxl")
    assert sd2["config_sha256"] != sdxl["config_sha256"]

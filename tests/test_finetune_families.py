"""DreamBooth fine-tuning on every base-model family (issue 18): tiny SD 2.x (v-prediction) and tiny
SDXL (two encoders, pooled embeddings, size time ids) train, save checkpoints diffusers loads, and
refuse a base of another family. SD 1.x is tests/test_finetune.py."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from dreamblend_ray.config import FinetuneConfig, SamplingConfig
from dreamblend_ray.io import storage
from dreamblend_ray.io.images import decode_image
from dreamblend_ray.method.pair import AdapterPair, TwoUNetPair
from dreamblend_ray.method.sampler import DreamBlendSampler, plain_sample
from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.serving.requests import SubjectConflict, subject_load_error
from dreamblend_ray.training import checkpoints, layout
from dreamblend_ray.training.finetune import (crop_geometry, finetune_subject, loss_target, prepare_data,
                                              sample_indices, step_loss)

KINDS = ["tiny-sd2", "tiny-sdxl"]
FAMILY = {"tiny-sd2": "sd", "tiny-sdxl": "sdxl"}
R = 32
STEPS = 4
# Instance images of three shapes (width, height): a landscape, a portrait and a square one.
SIZES = [(48, 40), (40, 48), (32, 32)]

# The SDXL time ids diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py gives an image of
# (width, height) at --resolution 32 with --center_crop: its lines
#     original_size = (image.height, image.width); image = transforms.Resize(32)(image)
#     y1 = max(0, int(round((image.height - 32) / 2.0))); x1 = (the same for the width)
#     time_ids = list(original_size + (y1, x1) + (32, 32))
# run with torchvision 0.28.0 on blank PIL images of these sizes.
SCRIPT_TIME_IDS = {
    (32, 32): [32, 32, 0, 0, 32, 32], (48, 40): [40, 48, 0, 3, 32, 32], (40, 48): [48, 40, 3, 0, 32, 32],
    (33, 47): [47, 33, 6, 0, 32, 32], (100, 37): [37, 100, 0, 27, 32, 32], (35, 32): [32, 35, 0, 2, 32, 32],
    (47, 33): [33, 47, 0, 6, 32, 32], (37, 100): [100, 37, 27, 0, 32, 32], (64, 64): [64, 64, 0, 0, 32, 32],
    (51, 34): [34, 51, 0, 8, 32, 32], (1000, 750): [750, 1000, 0, 5, 32, 32], (43, 32): [32, 43, 0, 6, 32, 32],
    (45, 32): [32, 45, 0, 6, 32, 32],
}

# One thread: tiny training steps gain nothing from two, and CPU results stay bitwise reproducible.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def picture(i: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(i)
    a = np.full((height, width, 3), 30, np.uint8)
    a[height // 4: 3 * height // 4, width // 8: width // 2] = rng.integers(60, 255, 3, dtype=np.uint8)  # off-centre
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def images():
    return [picture(i, w, h) for i, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def bases():
    """Private tiny models: LoRA training adds and removes adapters on their UNets."""
    return {kind: build_tiny_components(seed=0, name=kind) for kind in KINDS}


def config(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{"steps": STEPS, "checkpoint_steps": (2, STEPS), "prior_preservation": False,
                             "learning_rate": 1e-2, **overrides})


@pytest.fixture(scope="module")
def trained(bases, images, tmp_path_factory):
    """One LoRA subject per family ("subj-tiny-sd2", "subj-tiny-sdxl"), 4 steps, checkpoints 2 and 4."""
    root = str(tmp_path_factory.mktemp("families"))
    manifests = {kind: finetune_subject(bases[kind], images, "dog", f"subj-{kind}", root, config(), progress=False)
                 for kind in KINDS}
    return root, manifests


def probe_inputs(components):
    """Fixed UNet inputs: latents, a timestep, text embeddings and the family's added conditioning."""
    gen = torch.Generator().manual_seed(7)
    unet = components.unet
    tokens = components.tokenizer.model_max_length
    latents = torch.randn(1, 4, 16, 16, generator=gen)
    embeds = torch.randn(1, tokens, unet.config.cross_attention_dim, generator=gen)
    added = None
    if components.family == "sdxl":
        pooled = torch.randn(1, components.text_encoder_2.config.projection_dim, generator=gen)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[40.0, 48.0, 0.0, 3.0, 32.0, 32.0]])}
    return latents, torch.tensor([400]), embeds, added


@torch.no_grad()
def unet_output(unet, inputs):
    latents, t, embeds, added = inputs
    return unet(latents, t, embeds, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------- training on each family

@pytest.mark.parametrize("kind", KINDS)
def test_lora_finetune_gives_a_pair_the_sampler_uses(kind, bases, trained):
    root, manifests = trained
    manifest, components = manifests[kind], bases[kind]
    assert len(manifest["loss_curve"]) == STEPS and np.isfinite(manifest["loss_curve"]).all()
    assert manifest["base"]["family"] == FAMILY[kind] and manifest["steps"] == [2, STEPS]
    assert layout.read_manifest(root, f"subj-{kind}") == manifest
    assert not getattr(components.unet, "peft_config", None)  # the training adapter is gone

    pair, _ = checkpoints.load_pair(root, f"subj-{kind}", components)
    try:
        assert isinstance(pair, AdapterPair) and (pair.guidance_adapter, pair.edit_adapter) == (
            f"subj-{kind}--g2", f"subj-{kind}--e{STEPS}")
        sampling = SamplingConfig(num_inference_steps=4, alpha=0.5)
        tuned = DreamBlendSampler(components).sample(pair, ["a photo of sks dog"], [0], sampling)
        plain = plain_sample(components, components.unet, ["a photo of sks dog"], [0], num_inference_steps=4)
    finally:
        checkpoints.unload_pair(pair, components)
    assert np.isfinite(tuned.arrays).all() and tuned.arrays.shape == (1, R, R, 3)
    assert np.abs(tuned.arrays - plain.arrays).max() > 1e-4
    assert tuned.attention_distance.shape[0] == 1


def test_the_loss_target_follows_the_prediction_type(bases):
    from diffusers import DDPMScheduler

    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 900])
    v_sched = DDPMScheduler.from_config(bases["tiny-sd2"].scheduler.config)
    assert v_sched.config.prediction_type == "v_prediction"
    torch.testing.assert_close(loss_target(v_sched, latents, noise, t), v_sched.get_velocity(latents, noise, t),
                               rtol=0, atol=0)
    assert not torch.allclose(loss_target(v_sched, latents, noise, t), noise)
    eps_sched = DDPMScheduler.from_config(bases["tiny-sdxl"].scheduler.config)
    assert loss_target(eps_sched, latents, noise, t) is noise
    with pytest.raises(ValueError, match="sample"):
        loss_target(DDPMScheduler.from_config(eps_sched.config, prediction_type="sample"), latents, noise, t)


class RecordingUNet:
    """Stands in for the UNet in ``step_loss``: records its inputs and predicts zeros, so the
    loss is the mean square of the target."""

    def __init__(self):
        self.calls = []

    def __call__(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        self.calls.append((sample, timestep, encoder_hidden_states, added_cond_kwargs))
        return (torch.zeros_like(sample),)


@pytest.mark.parametrize("kind", KINDS)
def test_training_rows_carry_their_images_conditioning_and_target(kind, bases, images):
    """One micro-batch with prior preservation and flips: every row's added conditioning is its
    own image's (instance rows by the sampled index, class rows the class images'), and the loss
    is against the family's target (v_prediction's velocity on tiny-sd2, the noise on tiny-sdxl)."""
    from contextlib import nullcontext

    from diffusers import DDPMScheduler

    components = bases[kind]
    prior = [picture(10 + i, R, R) for i in range(2)]
    data = prepare_data(components, images, prior, "a photo of sks dog", "a photo of dog", R, flip=True)
    scheduler = DDPMScheduler.from_config(components.scheduler.config)
    cfg = config(batch_size=5, prior_preservation=True, random_flip=True, seed=3)
    unet = RecordingUNet()
    loss = step_loss(unet, scheduler, data, cfg, torch.Generator().manual_seed(3), torch.Generator().manual_seed(4),
                     nullcontext(), torch.float32)

    index_gen, noise_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    idx = sample_indices(len(images), 5, True, index_gen)
    x0 = data.instance_mean[idx] + data.instance_std[idx] * torch.randn(5, 4, 16, 16, generator=noise_gen)
    prior_idx = sample_indices(len(prior), 5, True, index_gen)
    x0_prior = data.class_mean[prior_idx] + data.class_std[prior_idx] * torch.randn(5, 4, 16, 16, generator=noise_gen)
    latents = torch.cat([x0, x0_prior])
    noise = torch.randn(latents.shape, generator=noise_gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (10,), generator=noise_gen)
    sample, timestep, embeds, added = unet.calls[0]
    assert len(unet.calls) == 1 and torch.equal(timestep, t)
    torch.testing.assert_close(sample, scheduler.add_noise(latents, noise, t))
    torch.testing.assert_close(embeds, torch.cat([data.instance_embed.expand(5, -1, -1),
                                                  data.class_embed.expand(5, -1, -1)]))
    losses = loss_target(scheduler, latents, noise, t).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, losses[:5].mean() + cfg.prior_loss_weight * losses[5:].mean())
    if kind == "tiny-sd2":
        assert added is None and data.instance_added is None
        return
    geometry = [SCRIPT_TIME_IDS[size] for size in SIZES] * 2  # rows i + 3 are the mirrored images
    expected_ids = torch.tensor([geometry[i] for i in idx] + [[R, R, 0, 0, R, R]] * 5, dtype=torch.float32)
    torch.testing.assert_close(added["time_ids"], expected_ids, rtol=0, atol=0)
    pooled = [components.model_family.encode(components, [p]).pooled for p in ("a photo of sks dog", "a photo of dog")]
    torch.testing.assert_close(added["text_embeds"], torch.cat([pooled[0]] * 5 + [pooled[1]] * 5), rtol=0, atol=0)


def test_sdxl_time_ids_equal_diffusers_training_script(bases):
    """The crop geometry and the time ids fine-tuning gives the SDXL UNet for each image size are
    the ones diffusers' DreamBooth SDXL script computes (table above)."""
    for (width, height), expected in SCRIPT_TIME_IDS.items():
        g = crop_geometry(width, height, R)
        assert list(g.original_size + g.crop_top_left + (R, R)) == expected, (width, height)
    components = bases["tiny-sdxl"]
    sized = [picture(i, w, h) for i, (w, h) in enumerate(SCRIPT_TIME_IDS)]
    data = prepare_data(components, sized, [], "a photo of sks dog", "a photo of dog", R, flip=False)
    torch.testing.assert_close(data.instance_added["time_ids"],
                               torch.tensor(list(SCRIPT_TIME_IDS.values()), dtype=torch.float32), rtol=0, atol=0)
    assert data.instance_mean.shape == (len(SCRIPT_TIME_IDS), 4, 16, 16)


def test_prior_preservation_on_sdxl_uses_the_samplers_class_images(bases, images, tmp_path):
    components = bases["tiny-sdxl"]
    cfg = config(prior_preservation=True, num_class_images=2, class_sampling_steps=2, steps=2,
                 checkpoint_steps=(1, 2))
    manifest = finetune_subject(components, images, "dog", "prior", str(tmp_path), cfg, progress=False)
    assert manifest["num_class_images"] == 2 and manifest["class_prompt"] == "a photo of dog"
    assert np.isfinite(manifest["loss_curve"]).all()
    folder = storage.join(str(tmp_path), "class_images")
    names = sorted(storage.list_files(folder))
    assert len(names) == 2
    expected = plain_sample(components, components.unet, ["a photo of dog"] * 2, [0, 1], num_inference_steps=2,
                            guidance_scale=cfg.class_guidance_scale).images  # image i has seed i
    for name, image in zip(names, expected):
        cached = decode_image(storage.read_bytes(storage.join(folder, name)), name)
        assert cached.size == (R, R)
        np.testing.assert_array_equal(np.asarray(cached), np.asarray(image))


def test_full_finetune_on_sdxl(bases, images, tmp_path):
    components = bases["tiny-sdxl"]
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    manifest = finetune_subject(components, images, "dog", "full", str(tmp_path),
                                config(method="full", learning_rate=1e-3, steps=2, checkpoint_steps=(1, 2)),
                                progress=False)
    assert manifest["kind"] == "full" and manifest["base"]["family"] == "sdxl"
    assert np.isfinite(manifest["loss_curve"]).all()
    assert all(torch.equal(v, before[k]) for k, v in components.unet.state_dict().items())
    pair, _ = checkpoints.load_pair(str(tmp_path), "full", components)
    assert isinstance(pair, TwoUNetPair)
    inputs = probe_inputs(components)
    assert (unet_output(pair.edit_unet, inputs) - unet_output(components.unet, inputs)).abs().max() > 1e-6


# --------------------------------------------------------------------------- checkpoints

def _pipeline(components):
    if components.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
            scheduler=components.scheduler, force_zeros_for_empty_prompt=True)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer, unet=components.unet,
                                   scheduler=components.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_checkpoint_loads_in_the_familys_diffusers_pipeline(kind, bases, trained):
    """``load_lora_weights(step_dir)`` of the family's pipeline changes its UNet to exactly what
    our own loading of the E adapter gives."""
    root, _ = trained
    pipe = _pipeline(build_tiny_components(seed=0, name=kind))  # a second copy of the same base
    inputs = probe_inputs(bases[kind])
    base_out = unet_output(pipe.unet, inputs)
    pipe.load_lora_weights(layout.checkpoint_uri(root, f"subj-{kind}", STEPS))
    diffusers_out = unet_output(pipe.unet, inputs)
    pair, _ = checkpoints.load_pair(root, f"subj-{kind}", bases[kind])
    try:
        with pair.edit() as unet:
            ours = unet_output(unet, inputs)
    finally:
        checkpoints.unload_pair(pair, bases[kind])
    assert (diffusers_out - base_out).abs().max() > 1e-4
    torch.testing.assert_close(diffusers_out, ours, rtol=1e-5, atol=1e-5)


def test_subject_on_a_base_of_another_family_is_refused(bases, trained, tmp_path):
    root, _ = trained
    with pytest.raises(ValueError, match=r"family 'sdxl'.*'tiny-sd2' is of family 'sd'") as info:
        checkpoints.load_pair(root, "subj-tiny-sdxl", bases["tiny-sd2"])
    assert isinstance(subject_load_error("subj-tiny-sdxl", info.value), SubjectConflict)  # HTTP 409
    with pytest.raises(ValueError, match=r"family 'sd'.*'tiny-sdxl' is of family 'sdxl'"):
        checkpoints.load_pair(root, "subj-tiny-sd2", bases["tiny-sdxl"])
    assert not getattr(bases["tiny-sd2"].unet, "peft_config", None)


def test_a_manifest_without_a_family_is_stable_diffusion(bases, trained, tmp_path):
    """Manifests written before families were recorded load on SD bases, and only there."""
    root, manifests = trained
    old = copy.deepcopy(manifests["tiny-sd2"])
    del old["base"]["family"]
    storage.copy_dir(layout.subject_uri(root, "subj-tiny-sd2"), layout.subject_uri(str(tmp_path), "subj-tiny-sd2"))
    layout.write_manifest(str(tmp_path), "subj-tiny-sd2", old)
    assert checkpoints.manifest_family(layout.read_manifest(str(tmp_path), "subj-tiny-sd2")) == "sd"
    pair, _ = checkpoints.load_pair(str(tmp_path), "subj-tiny-sd2", bases["tiny-sd2"])
    checkpoints.unload_pair(pair, bases["tiny-sd2"])
    with pytest.raises(ValueError, match="family 'sd'"):
        checkpoints.load_pair(str(tmp_path), "subj-tiny-sd2", bases["tiny-sdxl"])
    bad = copy.deepcopy(old)
    bad["base"]["family"] = 3
    with pytest.raises(ValueError, match="base.family"):
        layout.validate_manifest(bad)


def test_gradient_checkpointing_on_sdxl_gives_the_same_checkpoints(bases, images, tmp_path):
    components = bases["tiny-sdxl"]

    def weights(name, checkpointing):
        finetune_subject(components, images, "dog", name, str(tmp_path),
                         config(steps=2, checkpoint_steps=(2,), gradient_checkpointing=checkpointing), progress=False)
        return checkpoints.decode_safetensors(storage.read_bytes(layout.weight_uri(str(tmp_path), name, 2, "lora")))[0]

    plain, recomputed = weights("plain", False), weights("recomputed", True)
    assert plain.keys() == recomputed.keys() and plain
    for key, value in plain.items():
        torch.testing.assert_close(recomputed[key], value, rtol=1e-5, atol=1e-6)
    assert not components.unet.is_gradient_checkpointing


def test_cli_finetune_on_an_sdxl_base(tmp_path, images):
    from dreamblend_ray.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert main(["finetune", "--base", "tiny-sdxl", "--images", str(folder), "--class-noun", "dog",
                 "--subject-id", "cli-sdxl", "--output", str(out), "--steps", "2", "--checkpoint-steps", "1,2",
                 "--no-prior-preservation", "--no-progress"]) == 0
    manifest = layout.read_manifest(str(out), "cli-sdxl")
    assert manifest["base"]["family"] == "sdxl" and manifest["steps"] == [1, 2]

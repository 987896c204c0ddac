"""DreamBooth LoRA fine-tuning of the flow-matching families end to end (issue 31): finetune_subject on
tiny-flux and tiny-sd3 (with prior preservation) writes checkpoints in diffusers' transformer LoRA
format that FluxPipeline/StableDiffusion3Pipeline.load_lora_weights load unchanged, the manifest
records the family, the pair samples, and a base of another family is refused by name."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from dreamblend_ray.config import FinetuneConfig, SamplingConfig
from dreamblend_ray.method.pair import AdapterPair, single
from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.training import checkpoints, layout
from dreamblend_ray.training.finetune import finetune_subject, lora_targets

KINDS = ["tiny-flux", "tiny-sd3"]
STEPS = 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def picture(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    a = np.full((40, 40, 3), 30, np.uint8)
    a[10:30, 5:20] = rng.integers(60, 255, 3, dtype=np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def bases():
    return {kind: build_tiny_components(seed=0, name=kind) for kind in KINDS}


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("flow-subjects"))
    config = FinetuneConfig(steps=STEPS, checkpoint_steps=(2, STEPS), learning_rate=1e-2, num_class_images=2,
                            class_sampling_steps=2)
    manifests = {kind: finetune_subject(bases[kind], [picture(i) for i in range(3)], "dog", f"subj-{kind}", root,
                                        config, progress=False) for kind in KINDS}
    return root, manifests


@pytest.mark.parametrize("kind", KINDS)
def test_lora_finetune_gives_a_pair_the_sampler_uses(kind, bases, trained):
    root, manifests = trained
    manifest, components = manifests[kind], bases[kind]
    assert manifest["base"]["family"] == kind.removeprefix("tiny-") and manifest["steps"] == [2, STEPS]
    assert len(manifest["loss_curve"]) == STEPS and np.isfinite(manifest["loss_curve"]).all()
    assert manifest["num_class_images"] == 2
    assert not getattr(components.transformer, "peft_config", None)  # the training adapter is gone
    pair, _ = checkpoints.load_pair(root, f"subj-{kind}", components)
    try:
        assert isinstance(pair, AdapterPair)
        tuned = DreamBlendSampler(components).sample(pair, ["a photo of sks dog"], [0],
                                                     SamplingConfig(num_inference_steps=4, alpha=0.5))
    finally:
        checkpoints.unload_pair(pair, components)
    plain = DreamBlendSampler(components).sample(single(components.transformer), ["a photo of sks dog"], [0],
                                                 SamplingConfig(num_inference_steps=4, alpha=0))
    assert np.isfinite(tuned.arrays).all() and np.abs(tuned.arrays - plain.arrays).max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_load_unchanged_with_the_pipelines_loader(kind, bases, trained):
    root, _ = trained
    components, family = bases[kind], bases[kind].model_family
    step_dir = layout.checkpoint_uri(root, f"subj-{kind}", STEPS)
    fresh = build_tiny_components(seed=0, name=kind)
    parts = dict(scheduler=fresh.scheduler, vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                 text_encoder_2=fresh.text_encoder_2, tokenizer_2=fresh.tokenizer_2, transformer=fresh.transformer)
    pipe = FluxPipeline(**parts) if kind == "tiny-flux" else StableDiffusion3Pipeline(
        text_encoder_3=fresh.text_encoder_3, tokenizer_3=fresh.tokenizer_3, **parts)
    pipe.load_lora_weights(step_dir, adapter_name="theirs")
    text = family.encode(components, ["a photo of sks dog"])
    latents = family.pack(torch.randn(1, family.latent_channels(components), 16, 16,
                                      generator=torch.Generator().manual_seed(5)))
    t = torch.tensor([600.0])

    def output(transformer):
        with torch.no_grad():
            return family.denoise(transformer, latents, t, text.embeds, {"pooled_projections": text.pooled}, 3.5,
                                  (16, 16))

    pair, _ = checkpoints.load_pair(root, f"subj-{kind}", components)
    try:
        with pair.edit() as transformer:
            ours = output(transformer)
    finally:
        checkpoints.unload_pair(pair, components)
    assert (ours - output(components.transformer)).abs().max() > 1e-4  # the adapter matters
    assert (ours - output(pipe.transformer)).abs().max() < 1e-5
    expected = set(family.lora_target_modules)
    trained_modules = {name.split(".lora")[0].split(".", 2)[-1]
                       for name, _ in pipe.transformer.named_parameters() if "lora_A.theirs" in name}
    assert {m for m in trained_modules if any(m.endswith(t) for t in expected)} == trained_modules


def test_a_subject_of_another_family_is_refused_by_name(bases, trained):
    root, _ = trained
    with pytest.raises(ValueError, match="flux"):
        checkpoints.load_pair(root, "subj-tiny-flux", bases["tiny-sd3"])


def test_lora_targets_default_to_the_scripts_for_transformers(bases):
    assert lora_targets(bases["tiny-flux"].transformer, FinetuneConfig()) == \
        bases["tiny-flux"].model_family.lora_target_modules
    custom = FinetuneConfig(target_modules=("to_q",))
    assert lora_targets(bases["tiny-sd3"].transformer, custom) == ("to_q",)


def test_the_frozen_base_trains_in_the_autocast_dtype_on_gpus_for_flow_families(bases):
    from dreamblend_ray.training.finetune import frozen_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16 = FinetuneConfig(mixed_precision="bf16")
    assert frozen_dtype(bases["tiny-flux"], cuda, bf16) == torch.bfloat16  # as the scripts' weight_dtype
    assert frozen_dtype(bases["tiny-sd3"], cuda, FinetuneConfig(mixed_precision="fp16")) == torch.float16
    assert frozen_dtype(bases["tiny-flux"], cpu, bf16) is None  # CPU trains in fp32
    assert frozen_dtype(build_tiny_components(name="tiny"), cuda, bf16) is None  # UNet families keep fp32

"""CUDA paths: mixed-precision fine-tuning and half-precision DreamBlend sampling (skipped without a GPU).

The same paths ran on an H200 through benchmarks/bench_gpu.py (README, Benchmarks).
"""

import numpy as np
import pytest
import torch

from dreamblend_ray.training import checkpoints
from dreamblend_ray.models.components import load_components
from dreamblend_ray.config import FinetuneConfig, SamplingConfig
from dreamblend_ray.training.finetune import finetune_subject
from dreamblend_ray.method.pair import single
from dreamblend_ray.method.sampler import DreamBlendSampler

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def images():
    from dreamblend_ray.embedded.subjects import get_subject

    return get_subject("half-ring").instance_images()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_mixed_precision_finetune_is_finite_and_loads(tmp_path, images, precision, method):
    base = load_components("tiny", device="cuda")
    config = FinetuneConfig(method=method, steps=6, learning_rate=1e-3, batch_size=2, prior_preservation=False,
                            num_class_images=0, checkpoint_steps=(3, 6), guidance_step=3,
                            mixed_precision=precision)
    manifest = finetune_subject(base, images, "shape", "ring", str(tmp_path), config, progress=False)
    assert manifest["device"].startswith("cuda")
    assert np.isfinite(manifest["loss_curve"]).all()
    pair, _ = checkpoints.load_pair(str(tmp_path), "ring", base)
    assert all(p.device.type == "cuda" for unet in pair.unets for p in unet.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_guidance_is_finite_and_acts(tmp_path, images, dtype):
    base = load_components("tiny", device="cuda")
    config = FinetuneConfig(steps=6, learning_rate=1e-2, rank=4, batch_size=2, prior_preservation=False,
                            num_class_images=0, checkpoint_steps=(1, 6), guidance_step=1)
    finetune_subject(base, images, "shape", "ring", str(tmp_path), config, progress=False)
    components = load_components("tiny", device="cuda", dtype=dtype)
    pair, _ = checkpoints.load_pair(str(tmp_path), "ring", components)
    sampler = DreamBlendSampler(components)
    prompts, seeds = ["a photo of sks shape"] * 2, [0, 1]
    plain = sampler.sample(pair, prompts, seeds, SamplingConfig(num_inference_steps=6, alpha=0.0,
                                                                guidance_steps=3), track_distance=True)
    guided = sampler.sample(pair, prompts, seeds, SamplingConfig(num_inference_steps=6, alpha=0.5,
                                                                 guidance_steps=3))
    assert np.isfinite(guided.arrays).all() and np.isfinite(plain.arrays).all()
    assert guided.attention_distance.mean() < plain.attention_distance.mean()


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_t5_stays_on_the_cpu_between_encodings_on_a_gpu(name):
    offloaded = load_components(name, device="cuda", dtype=torch.bfloat16)  # offload_t5 defaults on for CUDA
    resident = load_components(name, device="cuda", dtype=torch.bfloat16, offload_t5=False)
    (t5,) = offloaded.offloaded
    assert next(getattr(offloaded, t5).parameters()).device.type == "cpu"
    config = SamplingConfig(num_inference_steps=4, alpha=0.5, guidance_steps=2)
    images = [DreamBlendSampler(c).sample(single(c.transformer), ["a photo of sks dog"], [3], config).arrays
              for c in (offloaded, resident)]
    assert next(getattr(offloaded, t5).parameters()).device.type == "cpu"
    assert next(getattr(resident, t5).parameters()).device.type == "cuda"
    assert np.abs(images[0] - images[1]).max() < 2 / 255

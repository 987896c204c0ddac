"""The guidance acts on a trained model: on the embedded model, with G an early and E a late
checkpoint of a demo subject (the demo's full fine-tune, shortened), prompts that add a second
object, alpha > 0 lowers the E-to-G attention distance and moves E's layout (the union of its
objects' masks) toward G's reference image, compared with alpha = 0 from the same noise."""

import numpy as np
import pytest

from dreamblend_ray.training import checkpoints
from dreamblend_ray.models.components import load_components
from dreamblend_ray.config import FinetuneConfig, SamplingConfig
from dreamblend_ray.embedded import metrics
from dreamblend_ray.embedded.subjects import get_subject
from dreamblend_ray.training.finetune import finetune_subject
from dreamblend_ray.method.sampler import DreamBlendSampler


def _masks(images):
    """Per image, the union of every object's mask (the layout), empty when none is found."""
    layouts = []
    for image in images:
        array = metrics.to_array(image)
        layouts.append(np.logical_or.reduce([np.zeros(array.shape[:2], bool)] + metrics.object_masks(array)))
    return layouts


@pytest.mark.slow
def test_guidance_moves_e_toward_g_on_the_embedded_model(tmp_path):
    components = load_components("embedded")
    subject = get_subject("striped-star")
    config = FinetuneConfig(method="full", steps=400, checkpoint_steps=(50, 400), learning_rate=3e-4,
                            batch_size=4, prior_preservation=False, num_class_images=0, token=subject.token)
    finetune_subject(components, subject.instance_images(), subject.class_noun, subject.subject_id,
                     str(tmp_path), config, progress=False)
    pair, manifest = checkpoints.load_pair(str(tmp_path), subject.subject_id, components)
    assert (manifest["guidance_step"], manifest["edit_step"]) == (50, 400)
    prompts = [p for p in subject.context_prompts("companion", 3) for _ in range(4)]
    seeds = list(range(4)) * 3
    sampler = DreamBlendSampler(components)

    def run(alpha):
        settings = SamplingConfig(alpha=alpha, num_inference_steps=20, guidance_scale=3.0,
                                  guidance_fraction=0.6, return_reference=True)
        result = sampler.sample(pair, prompts, seeds, settings, track_distance=True)
        iou = np.mean([metrics.iou(e, g) for e, g in zip(_masks(result.images),
                                                           _masks(result.reference_images))])
        return float(result.attention_distance.mean()), float(iou), result

    plain_distance, plain_iou, plain = run(0.0)
    guided_distance, guided_iou, guided = run(0.5)
    assert np.abs(guided.reference_arrays - plain.reference_arrays).max() < 1e-5  # G is untouched
    assert guided_distance < plain_distance
    assert guided_iou > plain_iou

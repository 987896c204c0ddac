"""Per-token heat maps (method/heatmaps.py, method/heatmap_report.py) and the sampler's maps option.

Properties: the maps come from the same call and change no image; each pixel's maps are a
distribution over the tokens; unguided E is plain sampling of E (alpha 0); an identical pair has
one set of maps; a sample's maps do not depend on its batch; the step range is honoured.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method import heatmaps
from dreamblend_ray.method.heatmap_report import ROWS, attention_reports, column_scales, render_grid
from dreamblend_ray.method.pair import TwoUNetPair, single
from dreamblend_ray.method.sampler import DreamBlendSampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster under load

STEPS = 5
PROMPTS = ["a sks dog beside a red ball", "a cat"]
CONFIG = SamplingConfig(num_inference_steps=STEPS, alpha=0.5, guidance_steps=3, attention_maps=True)


@pytest.fixture(scope="module")
def sampler(tiny_components):
    return DreamBlendSampler(tiny_components)


@pytest.fixture(scope="module")
def pair(tiny_components):
    from dreamblend_ray.models.components import build_tiny_components

    return TwoUNetPair(build_tiny_components(seed=1).unet, tiny_components.unet)


@pytest.fixture(scope="module")
def mapped(sampler, pair):
    return sampler.sample(pair, PROMPTS, [3, 4], CONFIG)


# --------------------------------------------------------------------------- pure maths


def test_layer_grid_upsamples_each_layer_to_the_finest_and_averages():
    coarse = torch.zeros(1, 4, 3)  # 2x2 layer, 3 tokens: all mass on token 0
    coarse[..., 0] = 1.0
    fine = torch.zeros(1, 16, 3)  # 4x4 layer: all mass on token 2
    fine[..., 2] = 1.0
    grid = heatmaps.layer_grid({"a": coarse, "b": fine}, (8, 8))
    assert grid.shape == (1, 3, 4, 4)
    assert torch.allclose(grid[0, 0], torch.full((4, 4), 0.5)) and torch.allclose(grid[0, 2], torch.full((4, 4), 0.5))
    assert torch.allclose(grid.sum(dim=1), torch.ones(1, 4, 4))


def test_layer_shape_keeps_the_latent_aspect_and_rejects_a_mismatch():
    assert heatmaps.layer_shape(8, (4, 8)) == (2, 4)
    assert heatmaps.layer_shape(32, (4, 8)) == (4, 8)
    with pytest.raises(ValueError, match="does not tile"):
        heatmaps.layer_shape(7, (4, 8))


def test_word_groups_join_bpe_pieces_and_skip_special_tokens():
    tokens = ["<|startoftext|>", "a</w>", "sk", "s</w>", "do", "g</w>", "<|endoftext|>", "<|endoftext|>"]
    groups = heatmaps.word_groups(tokens, {"<|startoftext|>", "<|endoftext|>"})
    assert groups == [("a", [1]), ("sks", [2, 3]), ("dog", [4, 5])]


def test_prompt_words_follow_the_tokenizer(tiny_components):
    groups = heatmaps.prompt_words(tiny_components.tokenizer, PROMPTS[0])
    assert [w for w, _ in groups] == PROMPTS[0].split()
    assert groups[0][1][0] == 1  # position 0 is start-of-text


def test_word_maps_sum_the_tokens_of_each_word():
    token_maps = torch.arange(4 * 2 * 2, dtype=torch.float32).view(4, 2, 2)
    words = heatmaps.word_maps(token_maps, [("x", [1]), ("yz", [2, 3])])
    assert torch.equal(words[0], token_maps[1]) and torch.equal(words[1], token_maps[2] + token_maps[3])
    assert heatmaps.word_maps(token_maps, []).shape == (0, 2, 2)


# --------------------------------------------------------------------------- the sampler's maps


def test_maps_come_back_for_every_row_and_are_token_distributions(mapped):
    assert set(mapped.attention_maps) == set(ROWS)
    for maps in mapped.attention_maps.values():
        assert maps.shape[0] == 2 and maps.dim() == 4
        assert torch.allclose(maps.sum(dim=1), torch.ones_like(maps[:, 0]), atol=1e-4)  # softmax over tokens
    assert len(mapped.reference_images) == len(mapped.edit_images) == 2


def test_maps_change_no_image(sampler, pair, mapped):
    plain = sampler.sample(pair, PROMPTS, [3, 4], dataclasses.replace(CONFIG, attention_maps=False,
                                                                     return_reference=True))
    assert np.array_equal(plain.arrays, mapped.arrays)
    assert np.array_equal(plain.reference_arrays, mapped.reference_arrays)


def test_unguided_e_is_plain_sampling_of_e_and_guidance_moves_the_maps(sampler, pair, mapped):
    alone = sampler.sample(pair, PROMPTS, [3, 4], dataclasses.replace(CONFIG, alpha=0.0))
    assert np.array_equal(alone.arrays, mapped.edit_arrays)
    assert torch.equal(alone.attention_maps["dreamblend"], mapped.attention_maps["edit"])
    assert not torch.equal(mapped.attention_maps["dreamblend"], mapped.attention_maps["edit"])
    # guidance pulls E's maps toward G's
    distance = {row: (mapped.attention_maps[row] - mapped.attention_maps["guidance"]).abs().sum().item()
                for row in ("edit", "dreamblend")}
    assert distance["dreamblend"] < distance["edit"]


def test_an_identical_pair_has_one_set_of_maps_and_images(sampler, tiny_components):
    result = sampler.sample(single(tiny_components.unet), PROMPTS[:1], [5], CONFIG)
    maps = result.attention_maps
    assert torch.equal(maps["guidance"], maps["dreamblend"]) and torch.equal(maps["edit"], maps["dreamblend"])
    assert np.array_equal(result.reference_arrays, result.arrays)


def test_a_samples_maps_do_not_depend_on_its_batch(sampler, pair, mapped):
    alone = sampler.sample(pair, PROMPTS[1:], [4], CONFIG)
    for row in ROWS:
        assert torch.allclose(alone.attention_maps[row][0], mapped.attention_maps[row][1], atol=1e-5)


def test_the_step_range_is_honoured_and_decode_false_skips_the_images(sampler, pair, mapped):
    first = sampler.sample(pair, PROMPTS, [3, 4], dataclasses.replace(CONFIG, maps_stop=1), decode=False)
    assert first.images == [] and first.edit_images is None
    assert not torch.allclose(first.attention_maps["dreamblend"], mapped.attention_maps["dreamblend"])
    last = sampler.sample(pair, PROMPTS, [3, 4], dataclasses.replace(CONFIG, maps_start=STEPS - 1), decode=False)
    assert not torch.allclose(last.attention_maps["edit"], first.attention_maps["edit"])


@pytest.mark.parametrize("kw", [dict(maps_stop=STEPS + 1), dict(maps_start=3, maps_stop=3), dict(maps_start=STEPS)])
def test_a_bad_step_range_is_a_value_error(kw):
    with pytest.raises(ValueError, match="maps_st"):
        SamplingConfig(num_inference_steps=STEPS, **kw)


# --------------------------------------------------------------------------- reports


def test_reports_grid_and_json(sampler, pair):
    reports = attention_reports(sampler, pair, PROMPTS, [3, 4], dataclasses.replace(CONFIG, attention_maps=False))
    first = reports[0]
    assert first.words == PROMPTS[0].split() and reports[1].words == ["a", "cat"]
    assert all(first.maps[row].shape[0] == len(first.words) for row in ROWS)
    assert len(first.distance) == CONFIG.window
    cell = 40
    wide, narrow = render_grid(first, cell), render_grid(reports[1], cell)
    assert wide.height == narrow.height  # three rows either way
    assert wide.width - narrow.width == (len(first.words) - 2) * (cell + 2)  # one column per word
    body = json.loads(json.dumps(first.to_json()))
    assert body["rows"] == list(ROWS) and np.array(body["maps"]["edit"]).shape == first.maps["edit"].shape


def test_column_scales_are_shared_over_the_rows(sampler, pair):
    report = attention_reports(sampler, pair, PROMPTS[:1], [3], CONFIG)[0]
    lows, spans = column_scales(report)
    stacked = np.stack([report.maps[row] for row in ROWS])
    assert np.allclose(lows, stacked.min(axis=(0, 2, 3))) and np.allclose(lows + spans, stacked.max(axis=(0, 2, 3)))

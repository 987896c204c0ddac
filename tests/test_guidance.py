import math

import pytest
import torch

from dreamblend_ray.method import guidance


def test_cfg_combine():
    uncond, cond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    both = torch.cat([uncond, cond])
    torch.testing.assert_close(guidance.cfg_combine(both, 1.0), cond)
    torch.testing.assert_close(guidance.cfg_combine(both, 3.0), uncond + 3 * (cond - uncond))


def test_token_mask_excludes_start_end_and_padding():
    eos = 9
    ids = torch.tensor([[0, 5, 6, 7, eos, eos, eos], [0, 5, eos, eos, eos, eos, eos]])
    mask = guidance.prompt_token_mask(ids, eos)
    assert mask.tolist() == [[False, True, True, True, False, False, False],
                             [False, True, False, False, False, False, False]]
    chosen = guidance.prompt_token_mask(ids, eos, token_indices=(2, 3))
    assert chosen.tolist()[0] == [False, False, True, True, False, False, False]
    assert chosen.tolist()[1] == [False] * 7


def _maps(batch=2, pixels=16, tokens=5, seed=0):
    return torch.softmax(torch.randn(batch, pixels, tokens, generator=torch.Generator().manual_seed(seed)), -1)


def test_distance_properties():
    mask = torch.ones(2, 5, dtype=torch.bool)
    a, b = {"l": _maps(seed=0)}, {"l": _maps(seed=1)}
    assert torch.equal(guidance.attention_distance(a, a, mask), torch.zeros(2))
    d_ab, d_ba = guidance.attention_distance(a, b, mask), guidance.attention_distance(b, a, mask)
    torch.testing.assert_close(d_ab, d_ba)
    assert (d_ab > 0).all() and (d_ab <= 2).all()
    onehot = lambda k: {"l": torch.nn.functional.one_hot(torch.full((2, 16), k), 5).float()}  # noqa: E731
    torch.testing.assert_close(guidance.attention_distance(onehot(1), onehot(2), mask), torch.full((2,), 2.0))


def test_distance_ignores_masked_tokens_and_averages_layers():
    a, b = _maps(seed=0), _maps(seed=1)
    b_masked = a.clone()
    b_masked[..., 0] = b[..., 0]
    mask = torch.tensor([[False, True, True, True, True]] * 2)
    assert torch.equal(guidance.attention_distance({"l": a}, {"l": b_masked}, mask), torch.zeros(2))
    one = guidance.attention_distance({"l": a}, {"l": b}, mask)
    two = guidance.attention_distance({"l": a, "m": a}, {"l": b, "m": a}, mask)
    torch.testing.assert_close(two, one / 2)
    with pytest.raises(ValueError, match="layers differ"):
        guidance.attention_distance({"l": a}, {"m": a}, mask)


def test_latent_update_scales_with_distance_and_is_per_sample():
    z, g = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = guidance.latent_update(z, g, torch.tensor([0.5, 0.0]), alpha=0.4, eta=2.0)
    step = (z - out).flatten(1)
    torch.testing.assert_close(step[0].pow(2).mean().sqrt(), torch.tensor(0.4 * 2.0 * 0.5))
    assert torch.equal(out[1], z[1])
    cos = torch.nn.functional.cosine_similarity(step[0], g[0].flatten(), dim=0)
    assert cos > 0.999
    assert torch.equal(guidance.latent_update(z, torch.zeros_like(g), torch.ones(2), 1.0, 1.0), z)
    single = guidance.latent_update(z[:1], g[:1], torch.tensor([0.5]), alpha=0.4, eta=2.0)
    torch.testing.assert_close(single, out[:1])


def test_step_size_schedules():
    assert guidance.step_size("constant", 2.0, 3, 10) == 2.0
    assert guidance.step_size("linear", 2.0, 0, 10) == 2.0
    assert math.isclose(guidance.step_size("linear", 2.0, 5, 10), 1.0)
    assert math.isclose(guidance.step_size("cosine", 2.0, 5, 10), 1.0)
    assert guidance.step_size("cosine", 2.0, 0, 10) == 2.0
    assert guidance.step_size("linear", 2.0, 0, 0) == 0.0
    with pytest.raises(ValueError, match="eta_schedule"):
        guidance.step_size("exp", 1.0, 0, 10)


def test_registries_name_the_choices_and_refuse_unknown_names():
    import pytest

    assert set(guidance.ETA_SCHEDULES) >= {"constant", "linear", "cosine"}
    assert guidance.step_size("linear", 2.0, 1, 4) == pytest.approx(1.5)
    assert guidance.step_size("cosine", 2.0, 2, 4) == pytest.approx(1.0)
    assert guidance.step_size("constant", 2.0, 3, 4) == 2.0
    with pytest.raises(ValueError, match="eta_schedule must be one of"):
        guidance.step_size("exponential", 1.0, 0, 4)
    with pytest.raises(ValueError, match="already registered"):
        guidance.register(guidance.DISTANCES, "l1")(lambda *a: None)

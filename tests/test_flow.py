"""method/flow.py against diffusers' FlowMatchEulerDiscreteScheduler: the schedules the Flux and
SD3 pipelines set (custom sigmas, dynamic shift from the image token count) and the per-row
Euler step, step by step, with rows at different steps of different schedules in one batch."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift

from dreamblend_ray.method import flow
from dreamblend_ray.models import flux, sd3


def _pipeline_scheduler(config, steps, seq_len, custom):
    """The scheduler as the family's pipeline sets it up."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps) if custom else None
    kwargs = {}
    if scheduler.config.use_dynamic_shifting:
        kwargs["mu"] = flux_shift(seq_len, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                                  scheduler.config.base_shift, scheduler.config.max_shift)
    scheduler.set_timesteps(steps, sigmas=sigmas, **kwargs)
    return scheduler


CONFIGS = {"flux": (flux.scheduler().config, True), "sd3": (sd3.scheduler().config, False),
           "sd3-dynamic": ({**sd3.scheduler().config, "use_dynamic_shifting": True}, False)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps,seq_len", [(4, 64), (28, 4096), (10, 1024)])
def test_schedule_is_the_pipelines(name, steps, seq_len):
    config, custom = CONFIGS[name]
    ours = flow.schedule(config, steps, seq_len, custom)
    reference = _pipeline_scheduler(config, steps, seq_len, custom)
    assert torch.equal(ours.timesteps, reference.timesteps.float())
    assert torch.equal(ours.sigmas, reference.sigmas.float())


def test_the_shift_grows_with_the_image_token_count():
    assert flow.calculate_shift(256) == pytest.approx(0.5)
    assert flow.calculate_shift(4096) == pytest.approx(1.15)
    assert flow.calculate_shift(1024) == pytest.approx(flux_shift(1024))
    low = flow.schedule(flux.scheduler().config, 10, 256, True).sigmas
    high = flow.schedule(flux.scheduler().config, 10, 4096, True).sigmas
    assert (high[1:-1] > low[1:-1]).all()  # more tokens: more time at high noise


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_per_row_steps_match_the_scheduler_step_by_step(name):
    config, custom = CONFIGS[name]
    schedules = {steps: flow.schedule(config, steps, 64, custom) for steps in (4, 7)}
    gen = torch.Generator().manual_seed(0)
    shape = (16, 8)
    # row 0 runs the 7-step schedule from its start; row 1 joins the 4-step one three steps later
    refs = {steps: _pipeline_scheduler(config, steps, 64, custom) for steps in (4, 7)}
    samples = {steps: torch.randn(shape, generator=gen) for steps in (4, 7)}
    for i in range(7):
        velocity = torch.randn(2, *shape, generator=gen)
        active = [(0, 7, i)] + ([(1, 4, i - 3)] if i >= 3 else [])
        batch = torch.stack([samples[steps] for _, steps, _ in active])
        sigma = torch.stack([schedules[steps].sigmas[j] for _, steps, j in active])
        sigma_next = torch.stack([schedules[steps].sigmas[j + 1] for _, steps, j in active])
        stepped = flow.step(batch, velocity[[row for row, _, _ in active]], sigma, sigma_next)
        for k, (row, steps, j) in enumerate(active):
            t = refs[steps].timesteps[j]
            expected = refs[steps].step(velocity[row][None], t, samples[steps][None]).prev_sample[0]
            assert torch.equal(stepped[k], expected)
            samples[steps] = expected


def test_step_keeps_the_velocitys_dtype_and_computes_in_float32():
    sample = torch.randn(2, 4, 3).to(torch.bfloat16)
    velocity = torch.randn(2, 4, 3).to(torch.bfloat16)
    out = flow.step(sample, velocity, torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0]))
    assert out.dtype == torch.bfloat16
    expected = (sample.float() + torch.tensor([-0.5, -0.5]).view(2, 1, 1) * velocity).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_unsupported_scheduler_options_are_refused():
    with pytest.raises(ValueError, match="stochastic_sampling"):
        flow.schedule({**flux.scheduler().config, "stochastic_sampling": True}, 4, 64, True)

"""training/flow_lora.py: the flow-matching DreamBooth LoRA step equals the one diffusers'
train_dreambooth_lora_flux.py / _sd3.py compute (loss and LoRA gradients, with prior preservation),
and our checkpoints load unchanged with FluxPipeline/StableDiffusion3Pipeline.load_lora_weights."""

import math

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.training import flow_lora

KINDS = ["tiny-flux", "tiny-sd3"]


@pytest.fixture(scope="module", params=KINDS)
def components(request):
    return build_tiny_components(seed=0, name=request.param)


def _text(c, prompts):
    text = c.model_family.encode(c, prompts)
    return text.embeds, text.pooled


def script_step(c, transformer, model_input, prompt_embeds, pooled, args):
    """The loss of one step as the diffusers scripts write it (their variable names), prior preservation on."""
    scheduler = flow_lora.training_scheduler(c.scheduler.config)
    noise = torch.randn_like(model_input)
    bsz = model_input.shape[0]
    u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=bsz,
                                              logit_mean=args.logit_mean, logit_std=args.logit_std,
                                              mode_scale=args.mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten()[:, None, None, None]
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    if c.family == "flux":
        packed = FluxPipeline._pack_latents(noisy_model_input, bsz, model_input.shape[1], model_input.shape[2],
                                            model_input.shape[3])
        ids = FluxPipeline._prepare_latent_image_ids(bsz, model_input.shape[2] // 2, model_input.shape[3] // 2,
                                                     "cpu", torch.float32)
        guidance = torch.tensor([args.guidance_scale]).expand(bsz)
        model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                 pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                                 txt_ids=torch.zeros(prompt_embeds.shape[1], 3), img_ids=ids, return_dict=False)[0]
        vae_scale_factor = 2 ** (len(c.vae.config.block_out_channels) - 1)  # unpacked to the latent's own size
        model_pred = FluxPipeline._unpack_latents(model_pred, height=model_input.shape[2] * vae_scale_factor,
                                                  width=model_input.shape[3] * vae_scale_factor,
                                                  vae_scale_factor=vae_scale_factor)
        target = noise - model_input
    else:
        model_pred = transformer(hidden_states=noisy_model_input, timestep=timesteps,
                                 encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                                 return_dict=False)[0]
        model_pred = model_pred * (-sigmas) + noisy_model_input
        target = model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    w, w_prior = torch.chunk(weighting, 2, dim=0)
    prior_loss = torch.mean((w_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2)
                            .reshape(target_prior.shape[0], -1), 1).mean()
    loss = torch.mean((w.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
    return loss + args.prior_loss_weight * prior_loss


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap"])
def test_the_step_is_the_diffusers_scripts(components, scheme):
    c = components
    family, transformer = c.model_family, c.transformer
    params = flow_lora.add_lora(transformer, family, rank=4, alpha=8, adapter_name="step")
    try:
        torch.manual_seed(0)
        for p in params:  # a non-zero B so that every LoRA parameter has a gradient
            p.data.normal_(0, 0.05)
        config = flow_lora.FlowLossConfig.for_family(c.family, weighting_scheme=scheme, prior_loss_weight=0.7)
        latents = torch.randn(4, family.latent_channels(c), 16, 16, generator=torch.Generator().manual_seed(1))
        embeds, pooled = _text(c, ["a photo of sks dog", "a photo of sks dog", "a photo of dog", "a photo of dog"])

        torch.manual_seed(2)
        expected = script_step(c, transformer, latents, embeds, pooled, config)
        expected_grads = torch.autograd.grad(expected, params)
        torch.manual_seed(2)
        noise = torch.randn_like(latents)
        timesteps, sigmas = flow_lora.sample_timesteps(flow_lora.training_scheduler(c.scheduler.config), config, 4)
        ours = flow_lora.flow_loss(family, transformer, latents, noise, timesteps, sigmas, embeds, pooled, config,
                                   num_prior=2)
        grads = torch.autograd.grad(ours, params)
    finally:
        transformer.delete_adapters(["step"])
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-7)
    assert max((a - b).abs().max().item() for a, b in zip(grads, expected_grads)) < 1e-6


def test_checkpoints_load_unchanged_with_the_pipelines_loader(components, tmp_path):
    c = components
    family = c.model_family
    params = flow_lora.add_lora(c.transformer, family, rank=4, alpha=8, adapter_name="subject")
    try:
        torch.manual_seed(3)
        for p in params:
            p.data.normal_(0, 0.1)
        flow_lora.save_lora(family, c.transformer, "subject", tmp_path)
        latents = family.pack(torch.randn(1, family.latent_channels(c), 16, 16))
        embeds, pooled = _text(c, ["a photo of sks dog"])
        t = torch.tensor([500.0])
        with torch.no_grad():
            ours = family.denoise(c.transformer, latents, t, embeds, {"pooled_projections": pooled}, 3.5, (16, 16))
    finally:
        c.transformer.delete_adapters(["subject"])

    fresh = build_tiny_components(seed=0, name="tiny-" + c.family)
    parts = dict(scheduler=fresh.scheduler, vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                 text_encoder_2=fresh.text_encoder_2, tokenizer_2=fresh.tokenizer_2, transformer=fresh.transformer)
    pipe = FluxPipeline(**parts) if c.family == "flux" else StableDiffusion3Pipeline(
        text_encoder_3=fresh.text_encoder_3, tokenizer_3=fresh.tokenizer_3, **parts)
    pipe.load_lora_weights(tmp_path, adapter_name="loaded")
    with torch.no_grad():
        theirs = family.denoise(pipe.transformer, latents, t, embeds, {"pooled_projections": pooled}, 3.5, (16, 16))
        base = family.denoise(build_tiny_components(seed=0, name="tiny-" + c.family).transformer, latents, t, embeds,
                              {"pooled_projections": pooled}, 3.5, (16, 16))
    assert (ours - base).abs().max() > 1e-3  # the adapter matters
    assert (ours - theirs).abs().max() < 1e-5

    mine = build_tiny_components(seed=0, name="tiny-" + c.family).transformer
    flow_lora.load_lora(family, mine, tmp_path, "E")
    with torch.no_grad():
        again = family.denoise(mine, latents, t, embeds, {"pooled_projections": pooled}, 3.5, (16, 16))
    assert (ours - again).abs().max() < 1e-5


def test_loss_settings_are_validated():
    with pytest.raises(ValueError, match="weighting_scheme"):
        flow_lora.FlowLossConfig(weighting_scheme="lognormal")
    with pytest.raises(ValueError, match="families"):
        flow_lora.FlowLossConfig.for_family("sdxl")
    assert flow_lora.FlowLossConfig.for_family("sd3").weighting_scheme == "logit_normal"
    assert flow_lora.loss_weighting("cosmap", torch.tensor(0.5)).item() == pytest.approx(2 / (math.pi * 0.5))
    assert flow_lora.loss_weighting("sigma_sqrt", torch.tensor(0.5)).item() == pytest.approx(4.0)

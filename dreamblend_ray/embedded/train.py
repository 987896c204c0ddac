"""Train the embedded base model from scratch on CPU: ``python -m dreamblend_ray.embedded.train``.

Five stages, all seeded (the same command and seed give the same weights on the same
software stack and hardware; floating-point reductions may differ across CPUs):

1. render a fixed set of shapes-world scenes (:mod:`dreamblend_ray.embedded.world`);
2. train a small ``AutoencoderKL`` (32x32x3 <-> 16x16x4), then fold a per-channel latent
   normalisation into its ``quant_conv`` / ``post_quant_conv`` so that its latents have zero
   mean and unit variance per channel under ``scaling_factor = 1`` (diffusers' pipelines only
   know a single global scale);
3. train the UNet and the CLIP text encoder jointly on the cached latents: epsilon prediction on
   Stable Diffusion's noise schedule, min-SNR loss weighting, offset noise, 10% empty captions
   (for classifier-free guidance), AdamW with a linear warm-up then a constant rate, gradient
   clipping and an EMA of the weights (the EMA weights are what is saved);
4. refine the VAE decoder alone on base shapes drawn with two-colour patterns (the encoder, the
   latent space and so the UNet are untouched). Stage 2's VAE never sees a pattern and blurs
   them; the encoder keeps them in its latents, so a decoder trained to draw them is enough. The
   latents get extra Gaussian noise while it trains, so that it also decodes the UNet's slightly
   off-manifold samples cleanly. Neither the UNet nor the text encoder ever sees a pattern, and
   no stage sees a subject shape;
5. go on training the UNet and the text encoder (from stage 3's EMA weights) on a mix of one- and
   two-object scenes (``"a red circle and a blue square on a green background"``, objects of
   10-14 px at separated positions), so that a prompt can add a second object: spatial context,
   which a model routes through its cross-attention maps (the background colour is not; see
   docs/embedded.md). ``--compose-steps 0`` skips it.

``--decoder-only`` runs stage 4 alone on an existing model (how the shipped decoder was made).

``--compose-only`` runs stage 5 alone on an existing model (how the shipped UNet was made).

``--grow-from DIR`` grows the model in DIR (:mod:`dreamblend_ray.embedded.grow`: transformer
blocks at the 16x16 level, zero-initialised so that the output is unchanged), then runs stage 5
on it with ``--grow-lr`` for the new blocks, saving EMA checkpoints every ``--checkpoint-every``
steps under ``--out/checkpoints/step-N``, and the result to ``--out``.

Because the rate is constant after warm-up, a run stopped at step N equals a run with
``--unet-steps N``; checkpoints every ``--checkpoint-every`` steps make that usable.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreamblend_ray.config import check_range
from dreamblend_ray.embedded import world
from dreamblend_ray.embedded.grow import grow_unet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the embedded model's training (defaults reproduce the shipped weights)."""

    seed: int = 0
    scenes: int = 6000
    vae_steps: int = 300
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    unet_steps: int = 2750
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    noise_offset: float = 0.1
    snr_gamma: float = 5.0
    uncond: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    decoder_steps: int = 1000
    decoder_scenes: int = 4000
    decoder_lr: float = 1e-3
    decoder_latent_noise: float = 0.3
    compose_steps: int = 1500
    compose_scenes: int = 6000
    compose_lr: float = 5e-4
    compose_pairs: float = 0.5
    compose_drop_colour: float = 0.05  # a two-object caption leaves each object's colour out this often
    compose_generic_noun: float = 0.0  # ... and names an object "shape" this often ("a shape and a red circle")
    grow_lr: float = 1e-3
    threads: int = 1

    def __post_init__(self):
        check_range("scenes", self.scenes, 64, 10 ** 6)
        check_range("vae_steps", self.vae_steps, 0, 10 ** 6)
        check_range("unet_steps", self.unet_steps, 0, 10 ** 7)
        check_range("batch", self.batch, 1, 4096)
        check_range("vae_batch", self.vae_batch, 1, 4096)
        check_range("ema_decay", self.ema_decay, 0.0, 1.0)
        check_range("uncond", self.uncond, 0.0, 1.0)
        check_range("threads", self.threads, 1, 512)
        check_range("decoder_steps", self.decoder_steps, 0, 10 ** 6)
        check_range("decoder_scenes", self.decoder_scenes, 64, 10 ** 6)
        check_range("decoder_latent_noise", self.decoder_latent_noise, 0.0, 10.0)
        check_range("compose_steps", self.compose_steps, 0, 10 ** 7)
        check_range("compose_scenes", self.compose_scenes, 64, 10 ** 6)
        check_range("compose_pairs", self.compose_pairs, 0.0, 1.0)
        check_range("compose_drop_colour", self.compose_drop_colour, 0.0, 1.0)
        check_range("compose_generic_noun", self.compose_generic_noun, 0.0, 1.0)
        check_range("grow_lr", self.grow_lr, 0.0, 1.0)
        check_range("checkpoint_every", self.checkpoint_every, 1, 10 ** 7)


# --------------------------------------------------------------------------- models


def build_models(seed: int):
    """Fresh (untrained) VAE, UNet, text encoder and the world tokenizer, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = world.build_world_tokenizer()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        mid_block_add_attention=False, scaling_factor=1.0,
    )
    unet = UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(4, 8, 8), norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=world.MAX_TOKENS, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    return vae, unet, text_encoder, tokenizer


# --------------------------------------------------------------------------- data


def render_scenes(count: int, seed: int) -> tuple[torch.Tensor, list[world.Combo]]:
    """``count`` random training scenes as a (N, 3, 32, 32) tensor in [-1, 1] and their combos."""
    rng = random.Random(seed)
    combos = world.train_combos()
    images = np.empty((count, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.float32)
    chosen = []
    for i in range(count):
        combo = rng.choice(combos)
        cx, cy, size = world.random_box(rng)
        images[i] = world.render_array(world.Scene(combo.shape, (combo.colour,), combo.background,
                                                   cx, cy, size))
        chosen.append(combo)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1
    return tensor.contiguous(), chosen


def render_pattern_scenes(count: int, seed: int) -> torch.Tensor:
    """Base shapes, solid or with a random two-colour pattern (2-5 cells), for stage 4 only."""
    rng = random.Random(seed)
    images = np.empty((count, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.float32)
    for i in range(count):
        background = rng.choice(world.COLOURS)
        pattern = rng.choice(world.PATTERNS)
        others = [c for c in world.COLOURS if c != background]
        colours = (rng.choice(others),) if pattern == "solid" else tuple(rng.sample(others, 2))
        cx, cy, size = world.random_box(rng, world.MIN_SIZE, world.MAX_SIZE + 4)
        images[i] = world.render_array(world.Scene(rng.choice(world.BASE_SHAPES), colours, background,
                                                   cx, cy, size, pattern, rng.randint(2, 5)))
    return (torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1).contiguous()


def render_mixed_scenes(count: int, seed: int, pairs: float) -> tuple[torch.Tensor, list]:
    """Stage 5's scenes: a fraction ``pairs`` with two smaller objects (:class:`world.PairCombo`),
    the rest one object as in stage 1; as a (N, 3, 32, 32) tensor in [-1, 1] and their combos."""
    rng = random.Random(seed)
    combos = world.train_combos()
    images = np.empty((count, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.float32)
    chosen = []
    for i in range(count):
        if rng.random() < pairs:
            pair = world.random_pair(rng, combos)
            images[i] = world.render_array(*world.pair_scenes(rng, pair))
            chosen.append(pair)
            continue
        combo = rng.choice(combos)
        images[i] = world.render_array(world.Scene(combo.shape, (combo.colour,), combo.background,
                                                   *world.random_box(rng)))
        chosen.append(combo)
    return (torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1).contiguous(), chosen


def random_caption(rng: random.Random, combo, uncond: float, pair_drop_colour: float = 0.05,
                   pair_generic_noun: float = 0.0) -> str:
    """A caption of ``combo`` (a Combo or a PairCombo) from the grammar, or ``""`` with
    probability ``uncond``; ``pair_*``: :func:`random_pair_caption`'s rates."""
    if rng.random() < uncond:
        return ""
    if isinstance(combo, world.PairCombo):
        return random_pair_caption(rng, combo, pair_drop_colour, pair_generic_noun)
    mix = world.CaptionMix()
    template = rng.choices(range(3), weights=mix.templates)[0]
    shape = None if rng.random() < mix.generic_noun else combo.shape
    colour = None if rng.random() < mix.drop_colour else combo.colour
    background = None if rng.random() < mix.drop_background else combo.background
    return world.caption(shape, colour, background, template)


def random_pair_caption(rng: random.Random, pair: world.PairCombo, drop_colour: float = 0.05,
                        generic_noun: float = 0.0) -> str:
    """Both objects in random order (the order says nothing about where they are), each colour
    dropped with probability ``drop_colour``, each shape named "shape" with probability
    ``generic_noun`` (a subject prompt's "a sks shape and a red circle" is of that form), the
    background dropped now and then. The defaults are the shipped weights' (no generic noun: no
    random draw for it, so their caption stream is unchanged)."""
    mix = world.CaptionMix()
    objects = [pair.first, pair.second]
    rng.shuffle(objects)
    nouns = []
    for c in objects:
        colour = None if rng.random() < drop_colour else c.colour
        shape = "shape" if generic_noun and rng.random() < generic_noun else c.shape
        nouns.append(" ".join(w for w in (colour, shape) if w))
    background = None if rng.random() < mix.drop_background else pair.background
    return world.pair_caption(*nouns, background, template=int(rng.random() < 0.2))


# --------------------------------------------------------------------------- VAE


def train_vae(vae, images: torch.Tensor, config: TrainConfig) -> list[float]:
    """Reconstruction (MSE) plus a small KL term; returns the loss curve."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    vae.train()
    losses = []
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * min(1.0, (step + 1) / 50)
        batch = images[torch.randint(len(images), (config.vae_batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, batch) + config.kl_weight * posterior.kl().mean() / z[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.vae_steps - 1:
            logger.info("vae step %d/%d loss %.5f", step, config.vae_steps, loss)
    vae.eval()
    return losses


def refine_decoder(vae, images: torch.Tensor, config: TrainConfig) -> list[float]:
    """Stage 4: train the decoder alone to reconstruct ``images`` from frozen-encoder latents."""
    generator = torch.Generator().manual_seed(config.seed + 4)
    means, stds = encode(vae, images)
    params = list(vae.decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.decoder_lr, weight_decay=0.0)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True).train()
    losses = []
    for step in range(config.decoder_steps):
        index = torch.randint(len(images), (config.vae_batch,), generator=generator)
        z = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        spread = config.decoder_latent_noise * torch.rand((len(index), 1, 1, 1), generator=generator)
        z = z + spread * torch.randn(z.shape, generator=generator)
        loss = F.mse_loss(vae.decode(z).sample, images[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.decoder_steps - 1:
            logger.info("decoder step %d/%d loss %.5f", step, config.decoder_steps, np.mean(losses[-100:]))
    vae.requires_grad_(False).eval()
    return losses


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of ``images``, (N, 4, 16, 16) each."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        posterior = vae.encode(images[start:start + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def fold_latent_normalisation(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make the VAE's latents ``(z - mean) / std`` per channel, exactly, via its 1x1 convs.

    ``quant_conv`` outputs [posterior mean; log-variance] channels; ``post_quant_conv`` reads z.
    """
    channels = len(mean)
    q_weight, q_bias = vae.quant_conv.weight, vae.quant_conv.bias
    q_weight[:channels] /= std.view(-1, 1, 1, 1)
    q_bias[:channels] = (q_bias[:channels] - mean) / std
    q_bias[channels:] -= 2 * torch.log(std)
    p_weight, p_bias = vae.post_quant_conv.weight, vae.post_quant_conv.bias
    p_bias += (p_weight[:, :, 0, 0] * mean.view(1, -1)).sum(dim=1)
    p_weight *= std.view(1, -1, 1, 1)


# --------------------------------------------------------------------------- UNet + text encoder


class EMA:
    """Exponential moving average of a set of modules' parameters (with a short warm-up)."""

    def __init__(self, modules, decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, module in zip(self.shadow, self.modules):
            for s, p in zip(shadow.parameters(), module.parameters()):
                s.lerp_(p.detach(), 1 - decay)


def _tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(unet, text_encoder, tokenizer, latents, combos, config: TrainConfig,
               on_checkpoint=None, new_parameters: frozenset[str] = frozenset()) -> tuple[EMA, list[float]]:
    """Denoising training of UNet + text encoder on cached latent posteriors ``(mean, std)``;
    the UNet parameters named in ``new_parameters`` (grown blocks) learn at ``config.grow_lr``."""
    from dreamblend_ray.models.components import default_scheduler

    means, stds = latents
    alphas = default_scheduler().alphas_cumprod.float()
    generator = torch.Generator().manual_seed(config.seed + 2)
    rng = random.Random(config.seed + 3)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(_parameter_groups(unet, text_encoder, config, new_parameters),
                                  lr=config.lr, weight_decay=1e-2)
    ema = EMA([unet, text_encoder], config.ema_decay)
    unet.train()
    text_encoder.train()
    losses = []
    started = time.time()
    for step in range(config.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * min(1.0, (step + 1) / config.warmup)
        loss = _unet_loss(unet, text_encoder, tokenizer, means, stds, combos, alphas,
                          generator, rng, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        ema.update()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.unet_steps - 1:
            logger.info("unet step %d/%d loss %.4f (%.0f s)", step, config.unet_steps,
                        np.mean(losses[-50:]), time.time() - started)
        if on_checkpoint and (step + 1) % config.checkpoint_every == 0:
            on_checkpoint(step + 1, ema, losses)
    return ema, losses


def _parameter_groups(unet, text_encoder, config: TrainConfig, new_parameters: frozenset[str]) -> list[dict]:
    """One optimizer group at ``config.lr``, plus one at ``config.grow_lr`` for the new parameters."""
    new = [p for name, p in unet.named_parameters() if name in new_parameters]
    old = [p for name, p in unet.named_parameters() if name not in new_parameters]
    groups = [{"params": old + list(text_encoder.parameters()), "base_lr": config.lr}]
    if new:
        groups.append({"params": new, "base_lr": config.grow_lr})
    return groups


def _unet_loss(unet, text_encoder, tokenizer, means, stds, combos, alphas, generator, rng,
               config: TrainConfig) -> torch.Tensor:
    index = torch.randint(len(means), (config.batch,), generator=generator)
    z0 = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
    captions = [random_caption(rng, combos[i], config.uncond, config.compose_drop_colour,
                               config.compose_generic_noun) for i in index.tolist()]
    noise = torch.randn(z0.shape, generator=generator)
    noise = noise + config.noise_offset * torch.randn(z0.shape[:2] + (1, 1), generator=generator)
    t = torch.randint(len(alphas), (config.batch,), generator=generator)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
    hidden = text_encoder(_tokens(tokenizer, captions))[0]
    prediction = unet(noisy, t, encoder_hidden_states=hidden).sample
    snr = alphas[t] / (1 - alphas[t])
    weight = torch.clamp(snr, max=config.snr_gamma) / snr
    per_sample = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


# --------------------------------------------------------------------------- driver


def save(out: Path, vae, unet, text_encoder, tokenizer, meta: dict) -> None:
    from dreamblend_ray.models.components import Components, default_scheduler, save_components

    components = Components(unet, vae, text_encoder, tokenizer, default_scheduler(), "embedded")
    save_components(components, out)
    (out / "training.json").write_text(json.dumps(meta, indent=1))


def train(out: str | Path, config: TrainConfig = TrainConfig()) -> Path:
    """Run all stages and write the model (EMA weights) to ``out``; returns ``out``."""
    torch.set_num_threads(config.threads)
    out = Path(out)
    timings = {}
    started = time.time()
    vae, unet, text_encoder, tokenizer = build_models(config.seed)
    images, combos = render_scenes(config.scenes, config.seed)
    timings["render_s"] = time.time() - started
    logger.info("rendered %d scenes in %.0f s", len(images), timings["render_s"])
    vae_losses = train_vae(vae, images, config)
    means, _ = encode(vae, images)
    fold_latent_normalisation(vae, means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3)))
    latents = encode(vae, images)
    timings["vae_s"] = time.time() - started - timings["render_s"]
    logger.info("latent per-channel std after folding: %s", latents[0].std(dim=(0, 2, 3)).tolist())

    def checkpoint(step, ema, losses):
        meta = {"config": asdict(config), "unet_steps_done": step, "vae_losses": vae_losses[-10:],
                "unet_loss_last100": float(np.mean(losses[-100:])), "timings": dict(timings),
                "elapsed_s": time.time() - started}
        save(out / "checkpoints" / f"step-{step}", vae, ema.shadow[0], ema.shadow[1], tokenizer, meta)

    ema, losses = train_unet(unet, text_encoder, tokenizer, latents, combos, config, checkpoint)
    timings["unet_s"] = time.time() - started - timings["render_s"] - timings["vae_s"]
    compose_started = time.time()
    if config.compose_steps:
        ema, _ = compose(ema.shadow[0], ema.shadow[1], tokenizer, vae, config)
    timings["compose_s"] = time.time() - compose_started
    decoder_started = time.time()
    decoder_losses = refine_decoder(vae, render_pattern_scenes(config.decoder_scenes, config.seed + 5), config)
    timings["decoder_s"] = time.time() - decoder_started
    meta = {"config": asdict(config), "unet_steps_done": config.unet_steps, "timings": timings,
            "unet_loss_last100": float(np.mean(losses[-100:])), "elapsed_s": time.time() - started,
            "decoder_loss_last100": float(np.mean(decoder_losses[-100:])) if decoder_losses else None}
    save(out, vae, ema.shadow[0], ema.shadow[1], tokenizer, meta)
    logger.info("saved the embedded model to %s in %.0f s", out, time.time() - started)
    return out


def train_decoder_only(directory: str | Path, config: TrainConfig = TrainConfig()) -> Path:
    """Stage 4 alone on the model in ``directory`` (rewritten in place); the rest is unchanged."""
    directory, components = _existing_model(directory, config)
    started = time.time()
    losses = refine_decoder(components.vae, render_pattern_scenes(config.decoder_scenes, config.seed + 5), config)
    _save_stage(directory, components, "decoder", config, time.time() - started, losses)
    return directory


def compose(unet, text_encoder, tokenizer, vae, config: TrainConfig, on_checkpoint=None,
            new_parameters: frozenset[str] = frozenset()):
    """Stage 5: go on training UNet + text encoder on a mix of one- and two-object scenes, so
    that the model can put a second, named object beside the first (the spatial context that
    DreamBlend's cross-attention guidance can carry; see docs/embedded.md). Returns the EMA."""
    images, combos = render_mixed_scenes(config.compose_scenes, config.seed + 6, config.compose_pairs)
    latents = encode(vae, images)
    unet.requires_grad_(True)
    text_encoder.requires_grad_(True)
    stage = replace(config, unet_steps=config.compose_steps, lr=config.compose_lr, seed=config.seed + 6)
    ema, losses = train_unet(unet, text_encoder, tokenizer, latents, combos, stage, on_checkpoint,
                             new_parameters)
    return ema, losses


def train_compose_only(directory: str | Path, config: TrainConfig = TrainConfig()) -> Path:
    """Stage 5 alone on the model in ``directory`` (rewritten in place); VAE unchanged."""
    directory, components = _existing_model(directory, config)
    started = time.time()
    ema, losses = compose(components.unet, components.text_encoder, components.tokenizer, components.vae, config)
    components.unet, components.text_encoder = ema.shadow
    _save_stage(directory, components, "compose", config, time.time() - started, losses)
    return directory


def train_grown(out: str | Path, config: TrainConfig = TrainConfig(), grow_from: str | Path = "embedded") -> Path:
    """Grow the model in ``grow_from`` (attention at 16x16, output unchanged), then run stage 5 on
    it; EMA checkpoints go to ``out/checkpoints/step-N``, the result to ``out``."""
    source, components = _existing_model(grow_from, config)
    out = Path(out)
    started = time.time()
    old_names = {name for name, _ in components.unet.named_parameters()}
    components.unet = grow_unet(components.unet)
    new_parameters = frozenset(n for n, _ in components.unet.named_parameters() if n not in old_names)

    def checkpoint(step, ema, losses):
        snapshot = copy.copy(components)
        snapshot.unet, snapshot.text_encoder = ema.shadow
        _save_stage(out / "checkpoints" / f"step-{step}", snapshot, "compose", config,
                    time.time() - started, losses, source)

    ema, losses = compose(components.unet, components.text_encoder, components.tokenizer,
                          components.vae, config, checkpoint, new_parameters)
    components.unet, components.text_encoder = ema.shadow
    _save_stage(out, components, "compose", config, time.time() - started, losses, source,
                grown_from=str(grow_from), grow_lr=config.grow_lr, compose_seed=config.seed)
    return out


def _existing_model(directory: str | Path, config: TrainConfig):
    """``(directory, components)`` of a model to run one stage on; ValueError if there is none."""
    from dreamblend_ray.models.components import embedded_model_dir, load_components

    torch.set_num_threads(config.threads)
    if str(directory) == "embedded":
        directory = embedded_model_dir()
    directory = Path(directory)
    if not (directory / "model_index.json").is_file():
        raise ValueError(f"no model in {directory} (model_index.json missing); train one first")
    return directory, load_components(str(directory))


def _save_stage(directory: Path, components, stage: str, config: TrainConfig, seconds: float,
                losses: list[float], source: Path | None = None, **extra) -> None:
    """Rewrite the model in place after one stage (or write it to ``directory`` with the record of
    ``source``'s training), recording that stage's settings, time and loss."""
    meta_path = (source or directory) / "training.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("config", {}).update({k: v for k, v in asdict(config).items() if k.startswith(stage + "_")})
    meta.setdefault("timings", {})[f"{stage}_s"] = seconds
    meta[f"{stage}_threads"] = config.threads
    meta[f"{stage}_loss_last100"] = float(np.mean(losses[-100:])) if losses else None
    meta[f"{stage}_steps_done"] = len(losses)
    meta.update(extra)
    save(directory, components.vae, components.unet, components.text_encoder, components.tokenizer, meta)
    logger.info("stage %s on %s took %.0f s", stage, directory, seconds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--out", default=None,
                        help="output directory (default: the package's embedded/weights)")
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument("--decoder-only", action="store_true",
                       help="run stage 4 (decoder refinement) alone on the model in --out")
    stage.add_argument("--compose-only", action="store_true",
                       help="run stage 5 (two-object scenes) alone on the model in --out")
    stage.add_argument("--grow-from", default=None, metavar="DIR",
                       help="grow the model in DIR (or 'embedded') with attention at 16x16, "
                            "output unchanged, then run stage 5 on it; writes --out")
    for name, value in asdict(defaults).items():
        flags = ["--" + name.replace("_", "-")] + (["--steps"] if name == "unet_steps" else [])
        parser.add_argument(*flags, dest=name, type=type(value), default=value,
                            help=f"default {value}")


def runner(args: argparse.Namespace):
    """What the parsed arguments ask to run: all stages, stage 4 alone, stage 5 alone, or a grown
    model's stage 5."""
    if getattr(args, "grow_from", None):
        return functools.partial(train_grown, grow_from=args.grow_from)
    if args.decoder_only:
        return train_decoder_only
    return train_compose_only if args.compose_only else train


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{name: getattr(args, name) for name in asdict(TrainConfig())})


def main(argv: list[str] | None = None) -> int:
    from dreamblend_ray.models.components import embedded_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runner(args)(args.out or embedded_model_dir(), config_from_args(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""DreamBooth fine-tuning of one subject into an early/late checkpoint pair.

The algorithm is DreamBooth (Ruiz et al., 2023) as in diffusers'
``examples/dreambooth/train_dreambooth_lora.py``, per optimizer step::

    x0 ~ q(z | instance image)  (+ a class image when prior preservation is on)
    t ~ U{0, T-1},  eps ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = |f_theta(x_t, t, "a photo of {token} {class}") - target|^2
           + w_prior |f_theta(x_t', t', "a photo of {class}") - target'|^2
    AdamW step on the LoRA weights (or on every UNet weight with method="full")

The target follows ``scheduler.config.prediction_type``: the noise (epsilon, SD 1.x, SDXL) or the
velocity ``sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (v_prediction, SD 2.x 768 px). Text conditioning
comes from the base model's family (``models/prompts.text_conditioning``), with the family's added
conditioning row by row: for SDXL the pooled text embedding and the size "time ids" of each image,
``(original height, width) + (crop top, left) + (resolution, resolution)``, from the image's size
before the resize and its centre crop after it, as diffusers'
``examples/dreambooth/train_dreambooth_lora_sdxl.py`` computes them (its geometry is torchvision's
``Resize(R)`` then ``CenterCrop(R)``, which ``crop_geometry`` reproduces). Nothing here branches on
a model version.

Two things differ from the script, both for speed and neither changes the objective: the
frozen VAE encodes each image once (we keep the posterior's mean and std and sample
``mean + std * eps`` each step, the same distribution as ``latent_dist.sample()``), and the
frozen text encoders encode the two prompts once (once per distinct image size and crop, when the
family's added conditioning depends on them). One differs on purpose: the SDXL script gives a class
image the time ids of the instance image it is batched with; here each image has its own.

Class images for prior preservation come from the base model itself (plain DDIM + CFG through
the project's sampler, equal to the family's diffusers pipeline) and are cached per base
model and class noun under ``{output_root}/class_images/``, so every subject of a class shares them.
Prior preservation is on by default (the DreamBooth paper's recipe; diffusers' scripts leave it
off): docs/finetuning.md says why and what it costs.

LoRA trains on the caller's UNet: the adapter is added at the start and deleted at the end,
so one ``Components`` object serves many fine-tunes (not concurrently, and not while it
samples). Full fine-tuning trains a copy. With the same seed, inputs and device, checkpoints are
bitwise identical on CPU.
"""

from __future__ import annotations

import logging
import math
import platform
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import diffusers
import numpy as np
import peft
import safetensors
import torch
import torch.nn.functional as F
import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image

from dreamblend_ray import __version__

from dreamblend_ray.training import checkpoints, flow_lora, layout, resume

from dreamblend_ray.io import storage
from dreamblend_ray.observability import context, metrics
from dreamblend_ray.io.images import decode_image, encode_png
from dreamblend_ray.models.components import Components, load_components, model_identity, select_device
from dreamblend_ray.models.prompts import text_conditioning
from dreamblend_ray.config import FinetuneConfig, SamplingConfig, to_dict, validate_class_noun, validate_subject_id
from dreamblend_ray.method.pair import adapters_disabled, single
from dreamblend_ray.method.sampler import DreamBlendSampler

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASS_IMAGE_BATCH = 8
VAE_BATCH = 16

StepCallback = Callable[[int, float], None]
Resumable = tuple["resume.ResumeState | None", Callable[[bytes], None]]


# --------------------------------------------------------------------------- instance images

def image_uris(sources: list[str]) -> list[str]:
    """Expand directory URIs into their (non-hidden, top-level) files; file URIs pass through.

    A source whose name ends in an image extension is a file; anything else is listed as a
    directory. Raises ValueError when nothing is found.
    """
    uris: list[str] = []
    for source in sources:
        if str(source).lower().endswith(IMAGE_EXTENSIONS):
            uris.append(str(source))
            continue
        names = [n for n in storage.list_files(source) if "/" not in n and not n.startswith(".")]
        if not names:
            raise ValueError(f"no image files found in {source}")
        uris.extend(storage.join(source, n) for n in names)
    if not uris:
        raise ValueError("no instance images given")
    return uris


def read_image(uri: str) -> Image.Image:
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, storage.StorageError) as exc:
        raise ValueError(f"cannot read instance image {uri}: {exc}") from exc
    return decode_image(data, uri)


def load_instance_images(images: list, min_size: int) -> list[Image.Image]:
    """PIL images from PIL images or URIs; ValueError naming the culprit for bad or small ones."""
    if not images:
        raise ValueError("no instance images given")
    loaded = []
    for i, item in enumerate(images):
        name = item if isinstance(item, str) else f"image #{i}"
        if isinstance(item, Image.Image):
            image = item.convert("RGB")
        elif isinstance(item, str):
            image = read_image(item)
        else:
            raise ValueError(f"{name}: instance images must be PIL images or URIs, got {type(item).__name__}")
        if min(image.size) < min_size:
            raise ValueError(f"{name} is too small: {image.size[0]}x{image.size[1]}, the shorter side "
                             f"must be at least {min_size} px")
        loaded.append(image)
    return loaded


@dataclass(frozen=True)
class CropGeometry:
    """Where a training image's pixels come from: its size before the resize ``(height, width)``,
    its size after it ``(height, width)``, and the centre crop's ``(top, left)`` in the resized image."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def crop_geometry(width: int, height: int, resolution: int) -> CropGeometry:
    """torchvision's ``Resize(resolution)`` (shorter side to ``resolution``, the longer one
    ``int(resolution * long / short)``) then ``CenterCrop(resolution)`` (offsets
    ``int(round((side - resolution) / 2))``), the geometry of diffusers' DreamBooth scripts."""
    if width <= height:
        new_w, new_h = resolution, int(resolution * height / width)
    else:
        new_w, new_h = int(resolution * width / height), resolution
    top, left = round((new_h - resolution) / 2.0), round((new_w - resolution) / 2.0)
    return CropGeometry((height, width), (new_h, new_w), (max(0, top), max(0, left)))


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (bicubic), centre-crop (``crop_geometry``), scale to
    [-1, 1]: (3, R, R)."""
    geometry = crop_geometry(*image.size, resolution)
    size = geometry.resized_size[::-1]
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    top, left = geometry.crop_top_left
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- frozen encoders

@torch.no_grad()
def encode_posterior(components: Components, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior of ``pixels`` (N, 3, R, R), scaled to UNet latents."""
    vae = components.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    for chunk in pixels.split(VAE_BATCH):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append((dist.mean.float() - shift) * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------- class images

def generate_class_images(components: Components, prompt: str, seeds: list[int], resolution: int,
                          config: FinetuneConfig) -> list[bytes]:
    """PNG bytes of base-model samples of ``prompt``, one per seed.

    Plain DDIM + CFG through the project's own sampler (alpha 0, adapters disabled), which matches
    the family's diffusers pipeline to float tolerance (tests/test_sampler.py, tests/test_families.py)
    without importing the pipeline classes and the image processors they pull in.
    """
    sampling = SamplingConfig(num_inference_steps=config.class_sampling_steps, alpha=0.0,
                              guidance_scale=config.class_guidance_scale, height=resolution, width=resolution)
    sampler, out = DreamBlendSampler(components), []
    with adapters_disabled(components.denoiser):
        for start in range(0, len(seeds), CLASS_IMAGE_BATCH):
            batch = seeds[start:start + CLASS_IMAGE_BATCH]
            result = sampler.sample(single(components.denoiser), [prompt] * len(batch), batch, sampling)
            out.extend(encode_png(image) for image in result.images)
    return out


def class_cache_dir(class_noun: str, config: FinetuneConfig) -> str:
    """The cache folder name: the class noun (spaces as '_'), plus a prompt hash for a custom prompt."""
    import hashlib

    name = class_noun.replace(" ", "_")
    if config.class_prompt is not None:
        name += "--" + hashlib.sha256(config.class_prompt.encode()).hexdigest()[:8]
    return name


def class_images(components: Components, class_noun: str, root: str, resolution: int,
                 config: FinetuneConfig) -> list[Image.Image]:
    """``config.num_class_images`` prior images of the class, generated once and cached.

    Image ``i`` is sampled with seed ``i``, so the cache is a function of the base model, the
    prompt and the sampling settings, shared by every subject of the class.
    """
    sha = model_identity(components)["config_sha256"]
    folder = layout.class_images_uri(root, sha, class_cache_dir(class_noun, config))
    names = [f"{i:04d}.png" for i in range(config.num_class_images)]
    present = set(storage.list_dir(folder))
    missing = [i for i, name in enumerate(names) if name not in present]
    blobs: dict[int, bytes] = {}
    if missing:
        logger.info("generating %d class images of %r into %s", len(missing), class_noun, folder)
        prompt = config.class_prompt_for(class_noun)
        for i, data in zip(missing, generate_class_images(components, prompt, missing, resolution, config)):
            storage.write_bytes(storage.join(folder, names[i]), data)
            blobs[i] = data
    images = []
    for i, name in enumerate(names):
        uri = storage.join(folder, name)
        images.append(decode_image(blobs[i] if i in blobs else storage.read_bytes(uri), uri))
    return images


# --------------------------------------------------------------------------- training pieces

@dataclass
class TrainData:
    """Frozen-encoder outputs the loop samples from. Latents: (N, C, h, w); embeddings: (1, T, D);
    ``*_added``: the family's added conditioning (SDXL: ``text_embeds``, ``time_ids``) with one row
    per latent row (None for families without it)."""

    instance_mean: torch.Tensor
    instance_std: torch.Tensor
    instance_embed: torch.Tensor
    class_mean: torch.Tensor | None = None
    class_std: torch.Tensor | None = None
    class_embed: torch.Tensor | None = None
    instance_added: dict[str, torch.Tensor] | None = None
    class_added: dict[str, torch.Tensor] | None = None


def image_conditioning(components: Components, prompt: str, geometries: list[CropGeometry],
                       resolution: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``prompt``'s embeddings (1, T, D) float32 and the family's added conditioning, one row per
    image geometry (float32; None when the family has none), via ``models.prompts.text_conditioning``."""
    by_geometry: dict[tuple, object] = {}
    for g in geometries:
        key = (g.original_size, g.crop_top_left)
        if key not in by_geometry:
            by_geometry[key] = text_conditioning(components, [prompt], resolution, resolution,
                                                 original_size=g.original_size, crop_top_left=g.crop_top_left)
    rows = [by_geometry[(g.original_size, g.crop_top_left)] for g in geometries]
    embeds = rows[0].embeds.float()
    if rows[0].added_cond_kwargs is None:
        return embeds, None
    return embeds, {key: torch.cat([row.added_cond_kwargs[key] for row in rows]).float()
                    for key in rows[0].added_cond_kwargs}


def prepare_data(components: Components, instance: list[Image.Image], prior: list[Image.Image],
                 instance_prompt: str, class_prompt: str, resolution: int, flip: bool) -> TrainData:
    def posterior(images):
        pixels = torch.stack([to_tensor(im, resolution) for im in images])
        if flip:  # index i + N is image i mirrored
            pixels = torch.cat([pixels, pixels.flip(-1)])
        return encode_posterior(components, pixels)

    def conditioning(images, prompt):
        # A mirrored copy keeps its image's time ids, as diffusers' script does for a centre crop.
        geometries = [crop_geometry(*im.size, resolution) for im in images] * (2 if flip else 1)
        return image_conditioning(components, prompt, geometries, resolution)

    embed, added = conditioning(instance, instance_prompt)
    data = TrainData(*posterior(instance), embed, instance_added=added)
    if prior:
        data.class_mean, data.class_std = posterior(prior)
        data.class_embed, data.class_added = conditioning(prior, class_prompt)
    return data


def sample_indices(count: int, size: int, flip: bool, index_gen: torch.Generator) -> torch.Tensor:
    """``size`` random image rows of ``count`` (of ``2 * count`` mirrored ones half the time when ``flip``)."""
    idx = torch.randint(0, count, (size,), generator=index_gen)
    if flip:
        idx = idx + count * torch.randint(0, 2, (size,), generator=index_gen)
    return idx


def sample_batch(mean: torch.Tensor, std: torch.Tensor, size: int, flip: bool,
                 index_gen: torch.Generator, noise_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` latents x0 ~ N(mean_i, std_i) of random images (mirrored half the time when
    ``flip``), and the rows ``i`` they came from."""
    count = mean.shape[0] // 2 if flip else mean.shape[0]
    idx = sample_indices(count, size, flip, index_gen).to(mean.device)
    eps = torch.randn(mean[idx].shape, generator=noise_gen, device=mean.device)
    return mean[idx] + std[idx] * eps, idx


def loss_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, per ``scheduler.config.prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}: fine-tuning trains epsilon or v_prediction models")


def diffusion_loss(unet, scheduler, latents: torch.Tensor, embeds: torch.Tensor,
                   noise_gen: torch.Generator, autocast, input_dtype: torch.dtype,
                   added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample MSE of the UNet's prediction at a random timestep: (B,) float32.

    Noise and targets stay float32; the UNet gets its inputs (and ``added``, its
    ``added_cond_kwargs`` row-aligned with ``latents``) in ``input_dtype``. A flow-matching family
    (Flux, SD3) passes its ``training.flow_lora.FlowObjective`` as ``scheduler``."""
    if isinstance(scheduler, flow_lora.FlowObjective):
        return scheduler.losses(unet, latents, embeds, noise_gen, autocast, input_dtype, added)
    noise = torch.randn(latents.shape, generator=noise_gen, device=latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=noise_gen, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = loss_target(scheduler, latents, noise, t)
    extra = None if added is None else {key: value.to(input_dtype) for key, value in added.items()}
    with autocast:
        pred = unet(noisy.to(input_dtype), t, embeds.to(input_dtype), added_cond_kwargs=extra,
                    return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def _rows(added: dict[str, torch.Tensor] | None, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
    return None if added is None else {key: value[idx] for key, value in added.items()}


def _cat(first: dict | None, second: dict | None) -> dict | None:
    return None if first is None else {key: torch.cat([first[key], second[key]]) for key in first}


def step_loss(unet, scheduler, data: TrainData, config: FinetuneConfig, index_gen, noise_gen,
              autocast, input_dtype: torch.dtype) -> torch.Tensor:
    """The DreamBooth loss of one micro-batch (instance MSE + w * class-prior MSE), one forward."""
    bs = config.batch_size
    latents, idx = sample_batch(data.instance_mean, data.instance_std, bs, config.random_flip, index_gen,
                                noise_gen)
    embeds, added = data.instance_embed.expand(bs, -1, -1), _rows(data.instance_added, idx)
    if data.class_mean is not None:
        prior, prior_idx = sample_batch(data.class_mean, data.class_std, bs, config.random_flip, index_gen,
                                        noise_gen)
        latents = torch.cat([latents, prior])
        embeds = torch.cat([embeds, data.class_embed.expand(bs, -1, -1)])
        added = _cat(added, _rows(data.class_added, prior_idx))
    losses = diffusion_loss(unet, scheduler, latents, embeds, noise_gen, autocast, input_dtype, added)
    if data.class_mean is None:
        return losses.mean()
    return losses[:bs].mean() + config.prior_loss_weight * losses[bs:].mean()


def precision(device: torch.device, config: FinetuneConfig) -> torch.dtype | None:
    """The autocast dtype: None (fp32) off CUDA or with mixed_precision="no"."""
    if device.type != "cuda" or config.mixed_precision == "no":
        return None
    if config.mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]


# --------------------------------------------------------------------------- the trainable UNet

def lora_targets(denoiser, config: FinetuneConfig) -> tuple[str, ...]:
    """The LoRA target modules: the configured ones, except that a transformer (Flux, SD3) left at
    the UNet default gets its diffusers DreamBooth script's default targets."""
    if config.target_modules == FinetuneConfig().target_modules and not isinstance(denoiser, UNet2DConditionModel):
        return flow_lora.default_targets(denoiser)
    return config.target_modules


@contextmanager
def lora_unet(unet, config: FinetuneConfig, adapter_name: str):
    """Add a trainable LoRA adapter to ``unet``; delete it (and restore the rest) on exit."""
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise ValueError(f"adapter {adapter_name!r} is already loaded on the UNet")
    previous = unet.active_adapters() if getattr(unet, "peft_config", None) else []
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                      target_modules=list(lora_targets(unet, config)))
    with torch.random.fork_rng(devices=[]):  # the gaussian init draws from the global CPU RNG
        torch.manual_seed(config.seed)
        unet.add_adapter(lora, adapter_name=adapter_name)
    try:
        params = [p for n, p in unet.named_parameters() if f".{adapter_name}." in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        yield unet, params
    finally:
        checkpoints.remove_adapters(unet, [adapter_name])
        if previous:
            unet.set_adapter(previous)
        unet.requires_grad_(False)  # after set_adapter, which marks active adapters trainable


@contextmanager
def full_unet(unet, config: FinetuneConfig):
    """A trainable fp32 copy of ``unet``'s base weights (adapters, if any, left out)."""
    state = {k: v.detach().clone().float() for k, v in checkpoints.base_unet_state(unet).items()}
    copy = checkpoints.empty_unet_like(unet)
    copy.load_state_dict(state, strict=True, assign=True)
    copy.to(unet.device).requires_grad_(True)
    yield copy, list(copy.parameters())


@contextmanager
def training_mode(unet, checkpointing: bool):
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()


# --------------------------------------------------------------------------- the run

@dataclass
class RunResult:
    loss_curve: list[float]
    steps_saved: list[int]
    train_seconds: float
    save_seconds: float


def adamw(params, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """The fine-tune's optimizer: the DreamBooth scripts' AdamW (betas 0.9/0.999, eps 1e-8) updating
    every tensor in one multi-tensor (foreach) call, which torch picks by itself only on CUDA; on a
    CPU it takes 0.46 ms instead of 0.74 ms per step on tiny-flux's 30 LoRA tensors."""
    return torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8,
                             foreach=True)


def train(unet, params, data: TrainData, scheduler, config: FinetuneConfig, save: Callable[[int], None],
          progress: bool, callback: StepCallback | None, desc: str, resumable: Resumable | None = None
          ) -> RunResult:
    """The optimisation loop: ``config.steps`` AdamW steps, ``save(step)`` on the schedule.

    ``resumable``: (saved resume point or None, writer): the loop starts after the saved point's
    step with its parameters, AdamW moments and random streams, and hands the writer a new resume
    point at every checkpoint (``training.resume``)."""
    from tqdm.auto import tqdm

    device = data.instance_mean.device
    input_dtype = unet.dtype  # a walk over all modules: once, not per step
    amp_dtype = precision(device, config)
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    optimizer = adamw(params, config.learning_rate, config.adam_weight_decay)
    warmup = config.lr_warmup_steps
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    index_gen = torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator(device).manual_seed(config.seed + 1)
    generators = {"index": index_gen, "noise": noise_gen}
    schedule, curve, saved = set(config.schedule()), [], []
    first = 1
    if resumable is not None and resumable[0] is not None:
        first = resume.restore(resumable[0], params, optimizer, generators) + 1
        with warnings.catch_warnings():  # fast-forwarding the schedule, before any optimizer step of this run
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            for _ in range(first - 1):
                lr_sched.step()
        saved = [s for s in sorted(schedule) if s < first]
        logger.info("%s: resuming after step %d of %d", desc, first - 1, config.steps)
    save_seconds, start = 0.0, time.perf_counter()
    checkpointing = config.gradient_checkpointing if config.gradient_checkpointing is not None \
        else device.type == "cuda"
    bar = tqdm(total=config.steps, initial=first - 1, desc=desc, unit="step", disable=not progress,
               dynamic_ncols=True)
    with training_mode(unet, checkpointing), bar:
        for step in range(first, config.steps + 1):
            loss = 0.0
            for _ in range(config.gradient_accumulation_steps):
                micro = step_loss(unet, scheduler, data, config, index_gen, noise_gen, autocast,
                                  input_dtype)
                micro = micro / config.gradient_accumulation_steps
                (scaler.scale(micro) if scaler else micro).backward()
                loss += micro.item()
            if scaler:
                scaler.unscale_(optimizer)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
            if step in schedule:
                t0 = time.perf_counter()
                save(step)
                if resumable is not None and step < config.steps:
                    resumable[1](resume.capture(step, params, optimizer, generators))
                save_seconds += time.perf_counter() - t0
                saved.append(step)
            if callback is not None:
                callback(step, loss)
    train_seconds = time.perf_counter() - start - save_seconds
    return RunResult(curve, saved, train_seconds, save_seconds)


def library_versions() -> dict:
    return {"dreamblend_ray": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def build_manifest(components: Components, subject_id: str, class_noun: str, config: FinetuneConfig,
                   result: RunResult, timings: dict, num_instance: int, num_class: int,
                   resolution: int) -> dict:
    """The subject manifest (schema: ``layout.validate_manifest``, version 1)."""
    guidance_step, edit_step = config.default_pair()
    return {
        "version": layout.MANIFEST_VERSION, "subject_id": subject_id, "class_noun": class_noun,
        "token": config.token, "instance_prompt": config.instance_prompt(class_noun),
        "class_prompt": config.class_prompt_for(class_noun) if config.prior_preservation else None,
        "base": model_identity(components), "kind": config.method,
        "weight_name": layout.WEIGHT_NAMES[config.method],
        "steps": result.steps_saved, "guidance_step": guidance_step, "edit_step": edit_step,
        "guidance_rule": f"saved step nearest {config.guidance_fraction:g} of the run"
        if config.guidance_step is None else "configured",
        "num_instance_images": num_instance, "num_class_images": num_class, "resolution": resolution,
        "device": str(components.device), "loss_curve": result.loss_curve, "config": to_dict(config),
        "timings": timings, "library_versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _resolve_base(base: Components | str, config: FinetuneConfig) -> Components:
    if isinstance(base, Components):
        return base
    if not isinstance(base, str):
        raise ValueError(f"base must be a Components object or a base name/URI, got {type(base).__name__}")
    device = select_device(config.device)
    components = load_components(base, device="cpu")
    return components.to(device, frozen_dtype(components, device, config))


def frozen_dtype(components: Components, device: torch.device, config: FinetuneConfig) -> torch.dtype | None:
    """The dtype of the frozen base while training: the autocast dtype for a flow-matching family
    (Flux, SD3: their scripts' ``weight_dtype``; a 12B transformer does not fit a GPU in fp32
    beside its activations), None (stay fp32) otherwise. The trained LoRA weights are fp32 either way."""
    return precision(device, config) if components.model_family.flow_matching else None


def training_resolution(components: Components, config: FinetuneConfig) -> int:
    """``config.resolution`` or the model's size; must survive the VAE and UNet downsampling."""
    multiple = components.model_family.latent_multiple(components)
    resolution = config.resolution or components.default_size
    if resolution % multiple:
        raise ValueError(f"resolution must be a multiple of {multiple} for this base model, got {resolution}")
    return resolution


def _clear_previous(root: str, subject_id: str) -> None:
    """Drop an old manifest first (the pair is incomplete from now on), then old checkpoints."""
    uri = layout.manifest_uri(root, subject_id)
    if storage.exists(uri):
        logger.info("replacing the existing fine-tune of %s", subject_id)
        storage.delete(uri)
    storage.delete(storage.join(layout.subject_uri(root, subject_id), "checkpoints"))


def finetune_subject(base: Components | str, images: list, class_noun: str, subject_id: str,
                     output_root: str, config: FinetuneConfig, progress: bool = True,
                     callback: StepCallback | None = None, resumable: bool = False) -> dict:
    """DreamBooth-fine-tune one subject; write its checkpoints and, last, its manifest.

    base: loaded components (trained in place for LoRA, restored on exit) or a base name/URI
        for ``load_components``. images: PIL images or image URIs (local paths or s3://).
    callback(step, loss) runs after every optimizer step (after that step's checkpoint); an
    exception from it aborts the run, leaving no manifest. ``resumable``: keep a resume point at
    every checkpoint, and continue from the one a killed run left (``training.resume``) instead of
    starting over. Returns the manifest.
    """
    t_start = time.perf_counter()
    validate_subject_id(subject_id)
    validate_class_noun(class_noun)
    if not isinstance(config, FinetuneConfig):
        raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    config.default_pair()  # a guidance_step off the schedule fails now, not after training
    components = _resolve_base(base, config)
    resolution = training_resolution(components, config)
    t0 = time.perf_counter()
    instance = load_instance_images(list(images), config.min_image_size or math.ceil(resolution / 2))
    timings = {"load_images_s": time.perf_counter() - t0}
    saved_point = resume.load(output_root, subject_id) if resumable else None
    if saved_point is None:
        _clear_previous(output_root, subject_id)
    else:
        storage.delete(layout.manifest_uri(output_root, subject_id))

    t0 = time.perf_counter()
    prior = class_images(components, class_noun, output_root, resolution, config) \
        if config.prior_preservation else []
    timings["class_images_s"] = time.perf_counter() - t0
    instance_prompt = config.instance_prompt(class_noun)
    t0 = time.perf_counter()
    data = prepare_data(components, instance, prior, instance_prompt, config.class_prompt_for(class_noun),
                        resolution, config.random_flip)
    timings["encode_s"] = time.perf_counter() - t0

    noise_scheduler = flow_lora.FlowObjective.of(components) if components.model_family.flow_matching \
        else DDPMScheduler.from_config(components.scheduler.config)
    adapter_name = f"finetune--{subject_id}"
    trainable = lora_unet(components.denoiser, config, adapter_name) if config.method == "lora" \
        else full_unet(components.denoiser, config)
    kind, family = context.training_kind.get(), components.family
    with trainable as (unet, params):
        def save(step: int) -> None:
            t0 = time.perf_counter()
            checkpoints.save_checkpoint(output_root, subject_id, step, unet, config.method, adapter_name)
            metrics.get("checkpoint_upload_seconds").observe(time.perf_counter() - t0, kind=kind)

        def counted(step: int, loss: float) -> None:
            metrics.get("training_steps").inc(kind=kind, family=family)
            if callback is not None:
                callback(step, loss)

        writer = (saved_point, lambda data: resume.save(output_root, subject_id, data)) if resumable else None
        result = train(unet, params, data, noise_scheduler, config, save, progress, counted,
                       desc=f"finetune {subject_id}", resumable=writer)
    if resumable:
        resume.discard(output_root, subject_id)
        timings["resumed_after_step"] = saved_point.step if saved_point is not None else 0

    timings.update(train_s=result.train_seconds, save_s=result.save_seconds,
                   steps_per_s=config.steps / max(result.train_seconds, 1e-9))
    timings["total_s"] = time.perf_counter() - t_start
    metrics.get("training_seconds").observe(timings["total_s"], kind=kind, family=family)
    manifest = build_manifest(components, subject_id, class_noun, config, result, timings,
                              num_instance=len(instance), num_class=len(prior), resolution=resolution)
    layout.write_manifest(output_root, subject_id, manifest)
    logger.info("fine-tuned %s: %d steps in %.1fs, checkpoints %s (G=%d, E=%d)", subject_id,
                config.steps, result.train_seconds, result.steps_saved, manifest["guidance_step"],
                manifest["edit_step"])
    return manifest

"""The CUDA paths, checked and timed: fine-tuning and sampling in fp32, fp16 and bf16, side by side.

Part 1, the embedded model (real trained weights), per precision: a LoRA and a full DreamBooth
fine-tune of a demo subject (steps/s, finite losses), then plain and DreamBlend sampling of the
fp32 LoRA pair (the same weights cast to each precision): s/image, NaN check, the analytic prompt
fidelity, and the mean absolute pixel difference (0-255) to the fp32 images of the same seeds.

Part 2, a random model of Stable Diffusion 1.5's shapes (860M-parameter UNet, 512 px, CLIP-L-sized
text encoder; no weights can be downloaded here), per half precision: plain sampling against
DreamBlend with the default window and with guidance at every step: the cost of the method at the
scale it is used at; and the serving path of issue 20 (``method/rows.py``, default window) with G's
step in its own UNet call and co-batched into E's (``rows`` / ``rows co_batch``; the issue's GPU
target: DreamBlend default over plain at 512 px, batch 1, at most 1.15x co-batched: ``--sd-batch 1``).

Part 3 (``--sdxl``, issue 18), a random model of SDXL 1.0's shapes (2.6B-parameter UNet with
``text_time`` added conditioning, 1024 px, CLIP-L + OpenCLIP-bigG-sized text encoders, SDXL's VAE
with ``force_upcast``), per half precision: plain against DreamBlend (default window, every step),
s/image, peak memory, and the dtype the VAE ran in (fp32 under fp16: Components keeps a
force_upcast VAE in fp32; bf16 under bf16).

Part 4 (``--flow flux`` / ``--flow sd35``, issue 31), random models of FLUX.1-dev's shapes (12B
transformer: 19 double- and 38 single-stream blocks, 24 heads of 128, guidance embedding; the
16-channel f8 VAE with its shift) or SD3.5 Large's (8.1B: 38 joint blocks, 38 heads of 64, RMS q/k
norm), at 1024 px (4096 image tokens), per half precision (bf16; fp16 for SD3.5 too): plain
flow-matching sampling against DreamBlend (default window, every step), on a G/E pair of two LoRA
adapters: s/image, ratio to plain, peak memory. The text encoders have the real output widths
(CLIP-L 768, CLIP-G 1280, T5-XXL 4096) but two layers each: they run once per call and do not
change the sampling figures. ``--flow-shrink N`` divides the transformer's head count by N and
shrinks the encoders and VAE (a CPU dry run: ``--flow flux --flow-shrink 8 --flow-size 64``).

On a machine without CUDA only fp32 of part 1 runs (and part 2 is skipped); part 3 then runs in
fp32 only, a dry run of its code path meant for a shrunken model (``--sdxl-shrink 8 --sdxl-size 64``:
every width divided by 8, the same depths and conditioning). ``--sdxl-only`` skips parts 1 and 2.
Prints a table; the last line is ``RESULT {json}``.

    python benchmarks/bench_gpu.py [--finetune-steps 200] [--sd-steps 30] [--sd-batch 4]
        [--sdxl [--sdxl-only] [--sdxl-steps 30] [--sdxl-batch 2] [--sdxl-size 1024] [--sdxl-shrink 1]]
        [--flow flux|sd35 [--flow-only] [--flow-steps 28] [--flow-batch 1] [--flow-size 1024] [--flow-shrink 1]]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import PeakMemory, add_adapters  # noqa: E402

from dreamblend_ray.training import checkpoints  # noqa: E402
from dreamblend_ray.models.components import Components, default_scheduler, load_components  # noqa: E402
from dreamblend_ray.models.tokenizers import build_tokenizer  # noqa: E402
from dreamblend_ray.models.families import get as get_family  # noqa: E402
from dreamblend_ray.config import FinetuneConfig, SamplingConfig  # noqa: E402
from dreamblend_ray.embedded import metrics  # noqa: E402
from dreamblend_ray.embedded.subjects import get_subject  # noqa: E402
from dreamblend_ray.training.finetune import finetune_subject  # noqa: E402
from dreamblend_ray.method.pair import AdapterPair  # noqa: E402
from dreamblend_ray.method.rows import RowEngine, RowRequest  # noqa: E402
from dreamblend_ray.method.sampler import DreamBlendSampler  # noqa: E402

logger = logging.getLogger("bench_gpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 1):
    """(result of the last call, best seconds, peak bytes) after one warm-up call."""
    fn()
    best, result = float("inf"), None
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return result, best, memory.peak


# --------------------------------------------------------------------------- part 1: embedded


def finetune_row(device, precision: str, method: str, root: str, steps: int) -> dict:
    subject = get_subject("striped-star")
    config = FinetuneConfig(method=method, steps=steps, learning_rate=2e-3 if method == "lora" else 3e-4,
                            rank=16, batch_size=4, prior_preservation=False, num_class_images=0,
                            checkpoint_steps=(steps // 4, steps), guidance_step=steps // 4,
                            mixed_precision="no" if precision == "fp32" else precision)
    base = load_components("embedded", device=device)  # fp32 master weights; autocast does the rest
    manifest = finetune_subject(base, subject.instance_images(), subject.class_noun,
                                f"star-{method}-{precision}", root, config, progress=False)
    curve = manifest.get("loss_curve") or []
    finite = bool(np.isfinite(curve).all()) if curve else None
    return {"part": "finetune", "precision": precision, "method": method,
            "steps_per_s": manifest["timings"]["steps_per_s"], "finite_loss": finite,
            "last_loss": float(np.mean(curve[-20:])) if curve else None}


def sampling_rows(device, precision: str, root: str, steps: int, reference: dict) -> list[dict]:
    subject = get_subject("striped-star")
    components = load_components("embedded", device=device, dtype=DTYPES[precision])
    pair, _ = checkpoints.load_pair(root, "star-lora-fp32", components)  # same weights in every precision
    sampler = DreamBlendSampler(components)
    prompts = [subject.prompt(bg) for bg in subject.new_backgrounds()[:2] for _ in range(4)]
    seeds = list(range(4)) * 2
    rows = []
    for name, alpha in (("plain", 0.0), ("DreamBlend", 0.25)):
        config = SamplingConfig(num_inference_steps=steps, guidance_scale=3.0, alpha=alpha)
        result, seconds, peak = timed(lambda: sampler.sample(pair, prompts, seeds, config), device)
        arrays = np.asarray(result.arrays) * 255.0  # float, before 8-bit quantisation: NaNs show
        key = (name, "embedded")
        if precision == "fp32":
            reference[key] = arrays
        diff = float(np.abs(arrays - reference[key]).mean()) if key in reference else None
        rows.append({"part": "sample-embedded", "precision": precision, "variant": name,
                     "s_per_image": seconds / len(prompts), "peak_mb": peak / 2**20,
                     "nan": bool(np.isnan(arrays).any()),
                     "prompt_fidelity": metrics.prompt_fidelity(result.images, prompts)["overall"],
                     "mean_abs_diff_to_fp32": diff})
    checkpoints.unload_pair(pair, components)
    return rows


# --------------------------------------------------------------------------- part 2: SD-1.5-sized


def sd15_shaped_components(device, dtype) -> Components:
    """Random weights in SD 1.5's architecture (UNet 860M, VAE f8, 12-layer width-768 text encoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    words = "a photo of sks dog on the beach in snow wearing red hat".split()
    tokenizer = build_tokenizer(words, max_length=77)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    components = Components(unet, vae, text_encoder, tokenizer, default_scheduler(), source="sd15-shaped")
    return components.to(device, dtype).eval()


def adapter_sampling_rows(components, part: str, precision: str, steps: int, batch: int, extra=None) -> list[dict]:
    """Plain vs DreamBlend (default window, every step) s/image and peak memory on ``components``,
    whose UNet gets the two benchmark adapters; ``extra(result)`` adds columns to each row."""
    add_adapters(components.unet)
    sampler = DreamBlendSampler(components)
    pair = AdapterPair(components.unet, "early", "late")
    prompts, seeds = ["a photo of sks dog on the beach"] * batch, list(range(batch))
    default = SamplingConfig(num_inference_steps=steps)
    variants = {"plain": SamplingConfig(num_inference_steps=steps, alpha=0.0),
                f"DreamBlend K={default.window}": default,
                f"DreamBlend K={steps}": SamplingConfig(num_inference_steps=steps, guidance_steps=steps)}
    rows = []
    for name, config in variants.items():
        result, seconds, peak = timed(partial(sampler.sample, pair, prompts, seeds, config), device_of(components))
        rows.append({"part": part, "precision": precision, "variant": name,
                     "s_per_image": seconds / batch, "peak_mb": peak / 2**20,
                     "nan": bool(np.isnan(result.arrays).any()), **(extra(result) if extra else {})})
    requests = [RowRequest(prompt, seed, default, "early", "late") for prompt, seed in zip(prompts, seeds)]
    for co_batch in (False, True):  # issue 20: the serving path, G's step inside E's call or not
        engine = RowEngine(components, co_batch=co_batch)
        (arrays, _), seconds, peak = timed(partial(engine.run, requests), device_of(components))
        rows.append({"part": part, "precision": precision, "variant": f"rows{' co_batch' if co_batch else ''} "
                     f"K={default.window}", "s_per_image": seconds / batch, "peak_mb": peak / 2**20,
                     "nan": bool(np.isnan(arrays).any())})
    plain = rows[0]["s_per_image"]
    for row in rows:
        row["x_plain"] = row["s_per_image"] / plain
    del sampler, pair
    if device_of(components).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def device_of(components) -> torch.device:
    return components.unet.device


def sd_rows(device, precision: str, steps: int, batch: int) -> list[dict]:
    return adapter_sampling_rows(sd15_shaped_components(device, DTYPES[precision]), "sample-sd15-shaped",
                                 precision, steps, batch)


# --------------------------------------------------------------------------- part 3: SDXL-sized


def sdxl_shaped_components(device, dtype, size: int = 1024, shrink: int = 1) -> Components:
    """Random weights in SDXL 1.0's architecture (UNet 2.6B: blocks 320/640/1280, transformer depth
    1/2/10, ``text_time`` conditioning; CLIP-L and OpenCLIP-bigG-sized encoders, 2048-wide context;
    the f8 VAE with force_upcast), every width divided by ``shrink`` (depths and head counts kept)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if 320 % (shrink * 5) or size % 32:
        raise ValueError(f"--sdxl-shrink must divide 320 / 5 heads and --sdxl-size be a multiple of 32, "
                         f"got {shrink} and {size}")
    torch.manual_seed(0)
    words = "a photo of sks dog on the beach in snow wearing red hat".split()
    tokenizers = [build_tokenizer(words, max_length=77) for _ in range(2)]
    groups = 32 if shrink == 1 else 8
    width_l, width_g = 768 // shrink, 1280 // shrink

    def encoder(tokenizer, width, layers, heads, act, cls):
        return cls(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=width, hidden_act=act,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=size // 8, layers_per_block=2, block_out_channels=tuple(c // shrink for c in (320, 640, 1280)),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), norm_num_groups=groups,
            cross_attention_dim=width_l + width_g, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256 // shrink, projection_class_embeddings_input_dim=width_g + 6 * (256 // shrink))
        vae = AutoencoderKL(block_out_channels=tuple(c // shrink for c in (128, 256, 512, 512)), layers_per_block=2,
                            latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size, norm_num_groups=groups,
                            scaling_factor=0.13025, force_upcast=True)
        text_encoder = encoder(tokenizers[0], width_l, 12, 12, "quick_gelu", CLIPTextModel)
        text_encoder_2 = encoder(tokenizers[1], width_g, 32, 20, "gelu", CLIPTextModelWithProjection)
    components = Components(unet, vae, text_encoder, tokenizers[0], default_scheduler(), source="sdxl-shaped",
                            family="sdxl", text_encoder_2=text_encoder_2, tokenizer_2=tokenizers[1],
                            options=dict(get_family("sdxl").options))
    return components.to(device, dtype).eval()


def sdxl_rows(device, precision: str, steps: int, batch: int, size: int, shrink: int) -> list[dict]:
    components = sdxl_shaped_components(device, DTYPES[precision], size, shrink)
    unet_params = round(sum(p.numel() for p in components.unet.parameters()) / 1e9, 3)
    vae_dtype = str(components.vae.dtype).replace("torch.", "")
    return adapter_sampling_rows(components, "sample-sdxl-shaped", precision, steps, batch,
                                 lambda result: {"size": result.images[0].size[0], "vae_dtype": vae_dtype,
                                                 "unet_params_b": unet_params})


# --------------------------------------------------------------------------- part 4: Flux / SD3.5-sized

FLOW_SHAPES = {  # transformer kwargs of the released models (diffusers configs), heads divisible by --flow-shrink
    "flux": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "sd35": dict(patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                 out_channels=16, qk_norm="rms_norm", pos_embed_max_size=192),
}


def flow_text_encoders(shrink: int, t5_width: int):
    """Two-layer CLIP-L-, CLIP-G- and T5-XXL-shaped encoders (real output widths unless shrunk)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dreamblend_ray.models.flow_family import tiny_t5
    from dreamblend_ray.models.tokenizers import build_t5_tokenizer

    words = "a photo of sks dog on the beach in snow wearing red hat".split()
    tokenizers = [build_tokenizer(words, max_length=77) for _ in range(2)]
    t5_tokenizer = build_t5_tokenizer(words, max_length=512 if shrink == 1 else 32)

    def clip(tokenizer, width):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
            num_attention_heads=8, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))

    widths = (768, 1280) if shrink == 1 else (64, 64)
    return tokenizers, [clip(t, w) for t, w in zip(tokenizers, widths)], t5_tokenizer, tiny_t5(t5_tokenizer, t5_width)


def flow_shaped_components(kind: str, device, dtype, size: int = 1024, shrink: int = 1) -> Components:
    """Random weights of FLUX.1-dev's (``flux``) or SD3.5 Large's (``sd35``) transformer, heads divided by
    ``shrink``, with the family's f8 16-channel VAE (widths divided by ``shrink``, at most 8) and text encoders."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    from dreamblend_ray.models import flux, sd3

    shape = dict(FLOW_SHAPES[kind])
    if shape["num_attention_heads"] % shrink or size % 16:
        raise ValueError(f"--flow-shrink must divide {kind}'s {shape['num_attention_heads']} heads and --flow-size "
                         f"be a multiple of 16, got {shrink} and {size}")
    shape["num_attention_heads"] //= shrink
    torch.manual_seed(0)
    t5_width = 4096 if shrink == 1 else 128
    tokenizers, clips, t5_tokenizer, t5 = flow_text_encoders(shrink, t5_width)
    with torch.device(device):
        shift, scale = (0.1159, 0.3611) if kind == "flux" else (0.0609, 1.5305)
        vae_shrink = min(shrink, 8)  # the VAE's widths stay divisible by its 8 norm groups
        vae = AutoencoderKL(latent_channels=16, block_out_channels=tuple(c // vae_shrink for c in (128, 256, 512, 512)),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32 if vae_shrink == 1 else 8,
                            sample_size=size, use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift,
                            scaling_factor=scale)
        if kind == "flux":
            transformer = FluxTransformer2DModel(joint_attention_dim=t5_width,
                                                 pooled_projection_dim=clips[0].config.hidden_size, **shape)
        else:
            transformer = SD3Transformer2DModel(
                sample_size=size // 8, joint_attention_dim=t5_width,
                caption_projection_dim=shape["num_attention_heads"] * shape["attention_head_dim"],
                pooled_projection_dim=sum(c.config.projection_dim for c in clips), **shape)
    if kind == "flux":  # FluxPipeline's CLIP is a CLIPTextModel (its pooler output), not the projection
        from transformers import CLIPTextModel

        clips[0] = CLIPTextModel(clips[0].config)
    parts = dict(vae=vae, text_encoder=clips[0], tokenizer=tokenizers[0], transformer=transformer,
                 source=f"{kind}-shaped", family="flux" if kind == "flux" else "sd3")
    if kind == "flux":
        components = Components(None, scheduler=flux.scheduler(), text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                                options={"sample_size": size // 8}, **parts)
    else:
        components = Components(None, scheduler=sd3.scheduler(), text_encoder_2=clips[1], tokenizer_2=tokenizers[1],
                                text_encoder_3=t5, tokenizer_3=t5_tokenizer, **parts)
    return components.to(device, dtype).eval()


def flow_rows(device, kind: str, precision: str, steps: int, batch: int, size: int, shrink: int) -> list[dict]:
    """Plain vs DreamBlend (default window, every step) s/image and peak memory on a Flux- or
    SD3.5-shaped model whose transformer gets the two benchmark adapters."""
    components = flow_shaped_components(kind, device, DTYPES[precision], size, shrink)
    params_b = round(sum(p.numel() for p in components.transformer.parameters()) / 1e9, 3)
    add_adapters(components.transformer)
    sampler, pair = DreamBlendSampler(components), AdapterPair(components.transformer, "early", "late")
    prompts, seeds = ["a photo of sks dog on the beach"] * batch, list(range(batch))
    default = SamplingConfig(num_inference_steps=steps, height=size, width=size)
    variants = {"plain": SamplingConfig(num_inference_steps=steps, alpha=0.0, height=size, width=size),
                f"DreamBlend K={default.window}": default,
                f"DreamBlend K={steps}": SamplingConfig(num_inference_steps=steps, guidance_steps=steps,
                                                        height=size, width=size)}
    rows = []
    for name, config in variants.items():
        result, seconds, peak = timed(partial(sampler.sample, pair, prompts, seeds, config), device)
        rows.append({"part": f"sample-{kind}-shaped", "precision": precision, "variant": name, "size": size,
                     "s_per_image": seconds / batch, "peak_mb": peak / 2**20, "transformer_params_b": params_b,
                     "nan": bool(np.isnan(result.arrays).any())})
    for row in rows:
        row["x_plain"] = row["s_per_image"] / rows[0]["s_per_image"]
    del sampler, pair, components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    columns = ("part", "precision", "method", "variant", "steps_per_s", "finite_loss", "last_loss",
               "s_per_image", "x_plain", "peak_mb", "nan", "size", "vae_dtype", "prompt_fidelity",
               "mean_abs_diff_to_fp32")
    shown = [c for c in columns if any(c in row for row in rows)]

    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [" | ".join(shown), " | ".join("---" for _ in shown)]
    lines += [" | ".join(cell(row.get(c)) for c in shown) for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps on the embedded model")
    parser.add_argument("--sd-steps", type=int, default=30)
    parser.add_argument("--sd-batch", type=int, default=4)
    parser.add_argument("--skip-sd", action="store_true")
    parser.add_argument("--sdxl", action="store_true", help="also run part 3, the SDXL-shaped model")
    parser.add_argument("--sdxl-only", action="store_true", help="run part 3 only")
    parser.add_argument("--sdxl-steps", type=int, default=30)
    parser.add_argument("--sdxl-batch", type=int, default=2)
    parser.add_argument("--sdxl-size", type=int, default=1024, help="image side in pixels (SDXL: 1024)")
    parser.add_argument("--sdxl-shrink", type=int, default=1,
                        help="divide every width by this (1: SDXL's real size; 8: a CPU dry run)")
    parser.add_argument("--flow", choices=sorted(FLOW_SHAPES), action="append", default=[],
                        help="also run part 4 on a FLUX.1-dev- or SD3.5-Large-shaped model (repeatable)")
    parser.add_argument("--flow-only", action="store_true", help="run part 4 only")
    parser.add_argument("--flow-steps", type=int, default=28)
    parser.add_argument("--flow-batch", type=int, default=1)
    parser.add_argument("--flow-size", type=int, default=1024)
    parser.add_argument("--flow-shrink", type=int, default=1,
                        help="divide the transformer's heads by this (1: the real size; a CPU dry run: 8 for flux, "
                             "19 for sd35)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.flow_only:
        args.sdxl_only, args.skip_sd = True, True
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precisions = ["fp32"] + (["fp16", "bf16"] if cuda else [])
    rows, reference = [], {}
    with tempfile.TemporaryDirectory() as root:
        for precision in precisions if not args.sdxl_only else []:
            for method in ("lora", "full"):
                rows.append(finetune_row(device, precision, method, root, args.finetune_steps))
                logger.warning("done %s", rows[-1])
            rows += sampling_rows(device, precision, root, args.steps, reference)
            logger.warning("done sampling %s", precision)
    if cuda and not args.skip_sd and not args.sdxl_only:
        for precision in ("fp16", "bf16"):
            rows += sd_rows(device, precision, args.sd_steps, args.sd_batch)
            logger.warning("done sd %s", precision)
    if (args.sdxl or args.sdxl_only) and not args.flow_only:
        for precision in ("fp16", "bf16") if cuda else ("fp32",):
            rows += sdxl_rows(device, precision, args.sdxl_steps, args.sdxl_batch, args.sdxl_size, args.sdxl_shrink)
            logger.warning("done sdxl %s", precision)
    for kind in args.flow:
        for precision in ("bf16", "fp16") if cuda else ("fp32",):
            if kind == "flux" and precision == "fp16":
                continue  # FLUX.1 is a bf16 model (its T5 overflows in fp16)
            rows += flow_rows(device, kind, precision, args.flow_steps, args.flow_batch, args.flow_size,
                              args.flow_shrink)
            logger.warning("done %s %s", kind, precision)
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")  # noqa: T201
    print(table(rows))  # noqa: T201 - a benchmark prints its table
    sd = {f"{r['precision']} {r['variant']}": round(r["x_plain"], 3) for r in rows if r["part"] == "sample-sd15-shaped"}
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "all_losses_finite": all(r["finite_loss"] is not False for r in rows if r["part"] == "finetune"),
        "any_nan_image": any(r.get("nan") for r in rows),
        "finetune_steps_per_s": {f"{r['precision']} {r['method']}": round(r["steps_per_s"], 1)
                                 for r in rows if r["part"] == "finetune"},
        "embedded_prompt_fidelity": {f"{r['precision']} {r['variant']}": r["prompt_fidelity"]
                                     for r in rows if r["part"] == "sample-embedded"},
        "embedded_mean_abs_diff_to_fp32": {f"{r['precision']} {r['variant']}": r["mean_abs_diff_to_fp32"]
                                           for r in rows if r["part"] == "sample-embedded"
                                           and r["precision"] != "fp32"},
        "sd15_shaped_ratio_to_plain": sd,
        "sd15_shaped_s_per_image": {f"{r['precision']} {r['variant']}": round(r["s_per_image"], 4)
                                    for r in rows if r["part"] == "sample-sd15-shaped"},
    }
    sdxl = [r for r in rows if r["part"] == "sample-sdxl-shaped"]
    if sdxl:
        result["sdxl_shaped"] = {
            "size": args.sdxl_size, "shrink": args.sdxl_shrink, "unet_params_b": sdxl[0]["unet_params_b"],
            "ratio_to_plain": {f"{r['precision']} {r['variant']}": round(r["x_plain"], 3) for r in sdxl},
            "s_per_image": {f"{r['precision']} {r['variant']}": round(r["s_per_image"], 4) for r in sdxl},
            "peak_mb": {f"{r['precision']} {r['variant']}": round(r["peak_mb"], 1) for r in sdxl},
            "vae_dtype": {r["precision"]: r["vae_dtype"] for r in sdxl if "vae_dtype" in r},
            "image_size": sdxl[0]["size"]}
    for kind in args.flow:
        flow = [r for r in rows if r["part"] == f"sample-{kind}-shaped"]
        result[f"{kind}_shaped"] = {
            "size": args.flow_size, "shrink": args.flow_shrink, "transformer_params_b": flow[0]["transformer_params_b"],
            "ratio_to_plain": {f"{r['precision']} {r['variant']}": round(r["x_plain"], 3) for r in flow},
            "s_per_image": {f"{r['precision']} {r['variant']}": round(r["s_per_image"], 4) for r in flow},
            "peak_mb": {f"{r['precision']} {r['variant']}": round(r["peak_mb"], 1) for r in flow}}
    print("RESULT " + json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()

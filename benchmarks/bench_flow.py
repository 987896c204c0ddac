"""Flux and SD3 on the CPU with the tiny models: what DreamBlend costs over plain flow sampling, and our
flow-matching fine-tune step against the step diffusers' DreamBooth LoRA scripts compute.

Part 1, per family (``tiny-flux``, ``tiny-sd3``): plain flow-matching sampling (alpha = 0) against
DreamBlend with the default window and with guidance at every step, on a G/E pair of two LoRA
adapters of one transformer (s/image, ratio to plain; the issue's target: default <= 2.0x).

Part 2, per family: one LoRA optimizer step (loss, backward, AdamW) of ``training/flow_lora.py``
against the same step written as ``train_dreambooth_lora_flux.py`` / ``_sd3.py`` write it
(their ``get_sigmas`` lookup, pack/unpack through the pipeline's static methods), in the same
process on the same adapter, each with its optimizer (the scripts' AdamW; ours, ``finetune.adamw``,
multi-tensor): steps/s and the ratio ours / script (target >= 1.0), best against best and, over the
interleaved pairs, the median and range of each pair's ratio.
Prints a table; the last line is ``RESULT {json}``. Never passes or fails on time.

    python benchmarks/bench_flow.py [--steps 10] [--batch 2] [--train-steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import add_adapters  # noqa: E402

from dreamblend_ray.config import SamplingConfig  # noqa: E402
from dreamblend_ray.method.pair import AdapterPair  # noqa: E402
from dreamblend_ray.method.sampler import DreamBlendSampler  # noqa: E402
from dreamblend_ray.models.components import build_tiny_components  # noqa: E402
from dreamblend_ray.training import finetune, flow_lora  # noqa: E402

logger = logging.getLogger("bench_flow")
KINDS = ("tiny-flux", "tiny-sd3")


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def sampling_rows(kind: str, steps: int, batch: int, repeats: int) -> list[dict]:
    components = build_tiny_components(name=kind)
    add_adapters(components.transformer)
    pair = AdapterPair(components.transformer, "early", "late")
    sampler = DreamBlendSampler(components)
    prompts, seeds = ["a photo of sks dog on the beach"] * batch, list(range(batch))
    default = SamplingConfig(num_inference_steps=steps)
    variants = {"plain": SamplingConfig(num_inference_steps=steps, alpha=0.0),
                f"DreamBlend K={default.window}": default,
                f"DreamBlend K={steps}": SamplingConfig(num_inference_steps=steps, guidance_steps=steps)}
    rows = [{"part": "sample", "base": kind, "variant": name,
             "s_per_image": best_of(partial(sampler.sample, pair, prompts, seeds, config), repeats) / batch}
            for name, config in variants.items()]
    for row in rows:
        row["x_plain"] = row["s_per_image"] / rows[0]["s_per_image"]
    return rows


def script_loss(c, transformer, scheduler, model_input, prompt_embeds, pooled, args):
    """One step's loss as the diffusers scripts write it (instance rows only)."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    noise = torch.randn_like(model_input)
    bsz = model_input.shape[0]
    u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=bsz,
                                              logit_mean=args.logit_mean, logit_std=args.logit_std,
                                              mode_scale=args.mode_scale)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten()[:, None, None, None]
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    if c.family == "flux":
        h, w = model_input.shape[2:]
        packed = FluxPipeline._pack_latents(noisy, bsz, model_input.shape[1], h, w)
        ids = FluxPipeline._prepare_latent_image_ids(bsz, h // 2, w // 2, "cpu", torch.float32)
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000,
                           guidance=torch.tensor([args.guidance_scale]).expand(bsz), pooled_projections=pooled,
                           encoder_hidden_states=prompt_embeds, txt_ids=torch.zeros(prompt_embeds.shape[1], 3),
                           img_ids=ids, return_dict=False)[0]
        factor = c.vae_scale_factor
        pred = FluxPipeline._unpack_latents(pred, height=h * factor, width=w * factor, vae_scale_factor=factor)
        target = noise - model_input
    else:
        pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        pred, target = pred * (-sigmas) + noisy, model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()


def our_loss(c, transformer, scheduler, latents, embeds, pooled, config):
    noise = torch.randn_like(latents)
    timesteps, sigmas = flow_lora.sample_timesteps(scheduler, config, latents.shape[0])
    return flow_lora.flow_loss(c.model_family, transformer, latents, noise, timesteps, sigmas, embeds, pooled, config)


def finetune_rows(kind: str, batch: int, train_steps: int, repeats: int) -> list[dict]:
    c = build_tiny_components(name=kind)
    family, transformer = c.model_family, c.transformer
    params = flow_lora.add_lora(transformer, family, rank=4, alpha=4, adapter_name="bench")
    optimizers = {  # each side's own: the scripts' AdamW (torch's default loop on a CPU), and ours
        "script": torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8),
        "ours": finetune.adamw(params, 1e-4, 1e-4)}
    config = flow_lora.FlowLossConfig.for_family(c.family)
    scheduler = flow_lora.training_scheduler(c.scheduler.config)
    latents = torch.randn(batch, family.latent_channels(c), 16, 16)
    text = family.encode(c, ["a photo of sks dog"] * batch)
    transformer.train()

    def run(loss_fn, optimizer):
        for _ in range(train_steps):
            loss = loss_fn(c, transformer, scheduler, latents, text.embeds, text.pooled, config)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = {"script": [], "ours": []}
    for _ in range(repeats):  # interleaved pairs, so that load from elsewhere hits both alike
        for name, fn in (("script", script_loss), ("ours", our_loss)):
            times[name].append(best_of(partial(run, fn, optimizers[name]), 1))
    transformer.eval()
    rows = [{"part": "finetune", "base": kind, "variant": name, "steps_per_s": train_steps / min(t)}
            for name, t in times.items()]
    pairs = sorted(script / ours for script, ours in zip(times["script"], times["ours"]))
    rows[1]["x_script"] = min(times["script"]) / min(times["ours"])  # best against best
    rows[1]["pair_ratios"] = pairs  # each interleaved pair's script / ours: the spread the load leaves
    return rows


def table(rows: list[dict]) -> str:
    columns = ("part", "base", "variant", "s_per_image", "x_plain", "steps_per_s", "x_script")
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    for row in rows:
        lines.append(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                                for c in columns))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="flow-matching steps per image")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    rows = []
    for kind in KINDS:
        rows += sampling_rows(kind, args.steps, args.batch, args.repeats)
        rows += finetune_rows(kind, args.batch, args.train_steps, args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")  # noqa: T201 - a benchmark prints
    print(table(rows))  # noqa: T201
    result = {
        "ratio_to_plain": {f"{r['base']} {r['variant']}": round(r["x_plain"], 3) for r in rows if r["part"] == "sample"},
        "s_per_image": {f"{r['base']} {r['variant']}": round(r["s_per_image"], 4) for r in rows if r["part"] == "sample"},
        "finetune_steps_per_s": {f"{r['base']} {r['variant']}": round(r["steps_per_s"], 2)
                                 for r in rows if r["part"] == "finetune"},
        "finetune_ours_over_script": {r["base"]: round(r["x_script"], 3) for r in rows if "x_script" in r},
        "finetune_pair_ratio_median": {r["base"]: round(statistics.median(r["pair_ratios"]), 3)
                                       for r in rows if "pair_ratios" in r},
        "finetune_pair_ratio_range": {r["base"]: [round(r["pair_ratios"][0], 3), round(r["pair_ratios"][-1], 3)]
                                      for r in rows if "pair_ratios" in r},
    }
    print("RESULT " + json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()

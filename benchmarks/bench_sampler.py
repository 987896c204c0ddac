"""Sampler cost: plain DDIM+CFG sampling of E vs DreamBlend (default window, every step) vs
diffusers' Attend-and-Excite, on the same components in one process.

G and E are two LoRA adapters on one base UNet (the production layout). Prints a table and, last,
``RESULT {json}`` with seconds per image, ratios to plain sampling and peak memory.

Any model family (issue 18): ``--base tiny-sdxl`` (or an SDXL directory) runs the same variants at
the family's default size; diffusers has Attend-and-Excite only for Stable Diffusion 1.x/2.x, so
that row is left out on SDXL (``attend_and_excite_ratio``: null).

    python benchmarks/bench_sampler.py [--base tiny|tiny-sd2|tiny-sdxl|embedded|DIR] [--steps 30] [--batch 4]
        [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

import psutil
import torch
from peft import LoraConfig

from dreamblend_ray.method.attention import cross_attention_layers
from dreamblend_ray.models.components import load_components, select_device
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method.pair import AdapterPair
from dreamblend_ray.method.sampler import DreamBlendSampler

logger = logging.getLogger("bench_sampler")
PROMPT = "a photo of sks dog on the beach"


class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or process RSS sampled every 2 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return self
        self.process, self.base, self.running = psutil.Process(), psutil.Process().memory_info().rss, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()


def add_adapters(unet, seed: int = 0) -> None:
    config = dict(r=4, lora_alpha=4, init_lora_weights="gaussian",
                  target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for offset, name in enumerate(("early", "late")):
        unet.add_adapter(LoraConfig(**config), adapter_name=name)
        generator = torch.Generator().manual_seed(seed + offset)
        with torch.no_grad():
            for pname, param in unet.named_parameters():
                if "lora_B" in pname and f".{name}." in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    unet.requires_grad_(False)


def time_variant(fn, images: int, repeats: int, device) -> tuple[float, int]:
    fn()  # warm-up
    best = float("inf")
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best / images, memory.peak


def attend_and_excite(components, steps: int, batch: int):
    from diffusers import StableDiffusionAttendAndExcitePipeline

    c = components
    pipe = StableDiffusionAttendAndExcitePipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=c.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    res = max(layer.resolution for layer in cross_attention_layers(c.unet))  # finest cross-attention
    tokens = [2, 5]

    def run():
        generator = [torch.Generator().manual_seed(s) for s in range(batch)]
        pipe([PROMPT] * batch, token_indices=[tokens] * batch, num_inference_steps=steps, guidance_scale=3.0,
             generator=generator, attn_res=(res, res), output_type="np")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device()
    components = load_components(args.base, device=device)
    add_adapters(components.unet)
    sampler = DreamBlendSampler(components)
    pair = AdapterPair(components.unet, "early", "late")
    prompts, seeds = [PROMPT] * args.batch, list(range(args.batch))
    default = SamplingConfig(num_inference_steps=args.steps)

    def dreamblend(config):
        return lambda: sampler.sample(pair, prompts, seeds, config)

    variants = {
        "plain (E, alpha=0)": dreamblend(SamplingConfig(num_inference_steps=args.steps, alpha=0.0)),
        f"DreamBlend default (K={default.window})": dreamblend(default),
        f"DreamBlend every step (K={args.steps})": dreamblend(
            SamplingConfig(num_inference_steps=args.steps, guidance_steps=args.steps)),
    }
    components.unet.set_adapter("late")
    if components.family == "sd":  # diffusers' Attend-and-Excite pipeline is Stable Diffusion's only
        variants["Attend-and-Excite (diffusers)"] = attend_and_excite(components, args.steps, args.batch)
    rows = {}
    for name, fn in variants.items():
        seconds, peak = time_variant(fn, args.batch, args.repeats, device)
        rows[name] = {"s_per_image": seconds, "peak_mb": peak / 2**20}
    plain = rows["plain (E, alpha=0)"]["s_per_image"]
    header = f"{'variant':38s} {'s/image':>9s} {'x plain':>8s} {'peak MB':>9s}"
    size = components.default_size
    lines = [f"base={args.base} ({components.family}, {size}x{size}) device={device} steps={args.steps} "
             f"batch={args.batch} threads={torch.get_num_threads()}", header, "-" * len(header)]
    for name, row in rows.items():
        row["ratio"] = row["s_per_image"] / plain
        lines.append(f"{name:38s} {row['s_per_image']:9.3f} {row['ratio']:8.2f} {row['peak_mb']:9.1f}")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its table
    names = list(rows)
    result = {
        "base": args.base, "family": components.family, "size": size, "device": str(device),
        "steps": args.steps, "batch": args.batch,
        "plain_s_per_image": round(plain, 4),
        "dreamblend_default_ratio": round(rows[names[1]]["ratio"], 3),
        "dreamblend_every_step_ratio": round(rows[names[2]]["ratio"], 3),
        "attend_and_excite_ratio": round(rows[names[3]]["ratio"], 3) if len(names) > 3 else None,
        "default_window": default.window,
        "peak_mb": {name: round(row["peak_mb"], 1) for name, row in rows.items()},
        "target_default_ratio_max": 2.0,
    }
    print("RESULT " + json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()

"""Measure the embedded base model: plain DDIM sampling through diffusers' StableDiffusionPipeline
assembled from the loaded components, scored by the analytic metrics.

``python -m dreamblend_ray.embedded.evaluate [--model DIR] [--steps 30] [--guidance 2.0 ...]``
prints per-attribute prompt fidelity on the held-out prompts (combinations never in a training
caption) and the diversity across seeds, and can save a grid of the images.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from PIL import Image

from dreamblend_ray.embedded import metrics, world

logger = logging.getLogger(__name__)


def pipeline(components):
    """A StableDiffusionPipeline over ``components`` (shared modules) with a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=DDIMScheduler.from_config(components.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(components, prompts: list[str], seeds: list[int], steps: int = 30,
             guidance_scale: float = 2.0, batch_size: int = 32) -> list[Image.Image]:
    """One image per (prompt, seed), plain DDIM + classifier-free guidance, per-sample generators."""
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have equal lengths, got {len(prompts)} and {len(seeds)}")
    pipe = pipeline(components)
    size = components.default_size
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[chunk]]
        result = pipe(prompts[chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators, height=size, width=size)
        images.extend(result.images)
    return images


def held_out_prompts(per_combo: int = 2) -> tuple[list[str], list[int]]:
    """Each held-out combination's canonical prompt ``per_combo`` times, with seeds 0, 1, ..."""
    prompts = [world.prompt(combo) for combo in world.held_out_combos() for _ in range(per_combo)]
    return prompts, list(range(len(prompts)))


def pair_prompts(count: int, seed: int = 11) -> tuple[list[str], list[int]]:
    """``count`` seeded two-object prompts (``"a red circle and a blue square on a green
    background"``), one seed each; most of these pairs never occur in stage 5's 3,000 scenes."""
    import random

    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        pair = world.random_pair(rng, world.train_combos())
        prompts.append(world.pair_caption(f"{pair.first.colour} {pair.first.shape}",
                                          f"{pair.second.colour} {pair.second.shape}", pair.background))
    return prompts, list(range(count))


def evaluate(components, prompts: list[str], seeds: list[int], steps: int = 30,
             guidance_scale: float = 2.0) -> tuple[dict, list[Image.Image]]:
    images = generate(components, prompts, seeds, steps, guidance_scale)
    report = {"prompt_fidelity": metrics.prompt_fidelity(images, prompts),
              "diversity": metrics.diversity(images), "steps": steps,
              "guidance_scale": guidance_scale}
    return report, images


def grid(images: list[Image.Image], columns: int, scale: int = 3) -> Image.Image:
    rows = (len(images) + columns - 1) // columns
    width, height = images[0].size
    canvas = Image.new("RGB", (columns * width, rows * height), "gray")
    for i, image in enumerate(images):
        canvas.paste(image, ((i % columns) * width, (i // columns) * height))
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> int:
    from dreamblend_ray.models.components import load_components

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded, tiny or a model directory")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    parser.add_argument("--per-combo", type=int, default=2, help="seeds per held-out combination")
    parser.add_argument("--train-combos", type=int, default=0,
                        help="also score this many training combinations (one seed each)")
    parser.add_argument("--pairs", type=int, default=0,
                        help="also score this many two-object prompts at every scale")
    parser.add_argument("--grid", default=None, help="save the images of the first scale here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    components = load_components(args.model)
    prompts, seeds = held_out_prompts(args.per_combo)
    results = {}
    for scale in args.guidance:
        report, images = evaluate(components, prompts, seeds, args.steps, scale)
        results[f"held_out@{scale}"] = report
        if args.grid and scale == args.guidance[0]:
            grid(images, columns=2 * args.per_combo).save(args.grid)
    for scale in args.guidance if args.pairs else ():
        pair_report, pair_images = evaluate(components, *pair_prompts(args.pairs), args.steps, scale)
        results[f"pairs@{scale}"] = pair_report
        if args.grid and scale == args.guidance[0]:
            grid(pair_images, columns=8).save(args.grid.replace(".png", "-pairs.png"))
    if args.train_combos:
        combos = world.train_combos()[:: max(1, len(world.train_combos()) // args.train_combos)]
        train_prompts = [world.prompt(c) for c in combos[: args.train_combos]]
        report, _ = evaluate(components, train_prompts, list(range(len(train_prompts))), args.steps,
                             args.guidance[0])
        results[f"train@{args.guidance[0]}"] = report
    json.dump(results, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

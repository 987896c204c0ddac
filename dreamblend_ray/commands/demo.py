"""``dreamblend demo``: the README's main job.

Interim version (until the embedded-model issue lands): plain DDIM+CFG sampling of a base model
into ``outputs/demo`` with a progress bar, one PNG per prompt.
"""

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("a photo of a dog on the beach", "a red toy in the snow", "a cat in the city")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="tiny", help="base model: tiny, embedded, a directory or s3:// URI")
    parser.add_argument("--out", default="outputs/demo", help="output directory")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")


def run(args: argparse.Namespace) -> int:
    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm import tqdm

    from dreamblend_ray.components import load_components

    c = load_components(args.base)
    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(tqdm(DEFAULT_PROMPTS, desc="demo images")):
        generator = torch.Generator().manual_seed(args.seed + i)
        image = pipe(prompt, num_inference_steps=args.steps, generator=generator).images[0]
        image.save(out / f"{i:02d}.png")
    logger.info("wrote %d images to %s", len(DEFAULT_PROMPTS), out)
    return 0

"""``dreamblend generate``: DreamBlend images of a subject, as PNGs plus a JSON sidecar.

Either a subject from a fine-tuning output root (its manifest's recorded pair, or step overrides)::

    dreamblend generate --checkpoints outputs/demo/storage --subject-id striped_star \\
        --prompt "a photo of sks star on a green background" --seed 0 --alpha 0.25 --out outputs/gen

or two checkpoint directories (LoRA or full fine-tune) given directly::

    dreamblend generate --base embedded --guidance-ckpt ROOT/subjects/x/checkpoints/step-100 \\
        --edit-ckpt ROOT/subjects/x/checkpoints/step-400 --prompt "..." --out outputs/gen
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dreamblend_ray import config
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.dtypes import add_dtype_argument
from dreamblend_ray.jobs.flags import add_base_argument

logger = logging.getLogger(__name__)

# layers is nested: the settings.json of a run, the HTTP API and the generation job take it.
SAMPLING_FLAGS = [name for name in config.settings_of(SamplingConfig) if name != "layers"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_base_argument(parser)
    source = parser.add_argument_group("the checkpoint pair (a subject, or two checkpoint URIs)")
    source.add_argument("--checkpoints", "--subject-root", dest="checkpoints",
                        help="root the subject was fine-tuned into (local or a storage URI)")
    source.add_argument("--subject-id", help="subject id under --checkpoints")
    source.add_argument("--guidance-step", type=int, default=None, help="override the manifest's G step")
    source.add_argument("--edit-step", type=int, default=None, help="override the manifest's E step")
    source.add_argument("--guidance-ckpt", help="G checkpoint directory URI (early, prompt-faithful)")
    source.add_argument("--edit-ckpt", help="E checkpoint directory URI (late, subject-faithful)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for more")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampling call")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    add_dtype_argument(parser)
    parser.add_argument("--out", required=True, help="output directory for PNGs and settings.json")
    config.add_arguments(parser.add_argument_group("sampling settings"), SamplingConfig, SAMPLING_FLAGS)


def load_pair_from_args(args, components):
    from dreamblend_ray.training import checkpoints

    by_subject = args.checkpoints or args.subject_id
    by_uri = args.guidance_ckpt or args.edit_ckpt
    if by_subject and by_uri:
        raise ValueError("give either --checkpoints/--subject-id or --guidance-ckpt/--edit-ckpt, not both")
    if by_subject:
        if not (args.checkpoints and args.subject_id):
            raise ValueError("--checkpoints and --subject-id go together")
        pair, _ = checkpoints.load_pair(args.checkpoints, args.subject_id, components,
                                        args.guidance_step, args.edit_step)
        return pair
    if not (args.guidance_ckpt and args.edit_ckpt):
        raise ValueError("give --guidance-ckpt and --edit-ckpt (or --checkpoints and --subject-id)")
    return checkpoints.load_checkpoint_pair(components, args.guidance_ckpt, args.edit_ckpt)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dreamblend_ray.models.components import load_components, model_identity, select_device, select_dtype
    from dreamblend_ray.method.sampler import DreamBlendSampler

    config.check_range("--num-images", args.num_images, 1, 64, integer=True)
    config.check_range("--batch-size", args.batch_size, 1, 256, integer=True)
    settings = config.from_args(SamplingConfig, args, SAMPLING_FLAGS)
    device = select_device(args.device)
    components = load_components(args.base, device=device, dtype=select_dtype(device, args.dtype))
    pair = load_pair_from_args(args, components)
    jobs = [(p, args.seed + k) for p in args.prompt for k in range(args.num_images)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sampler, records = DreamBlendSampler(components), []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="generate", unit="batch"):
        chunk = jobs[start:start + args.batch_size]
        negatives = None if args.negative_prompt is None else [args.negative_prompt] * len(chunk)
        result = sampler.sample(pair, [p for p, _ in chunk], [s for _, s in chunk], settings, negatives)
        for i, (prompt, seed) in enumerate(chunk):
            index = start + i
            record = {"index": index, "prompt": prompt, "seed": seed, "image": f"{index:04d}.png",
                      "seconds": result.seconds / len(chunk)}
            result.images[i].save(out / record["image"])
            if result.reference_images is not None:
                record["reference_image"] = f"{index:04d}-reference.png"
                result.reference_images[i].save(out / record["reference_image"])
            if result.attention_distance.numel():
                record["mean_attention_distance"] = float(result.attention_distance[i].mean())
            records.append(record)
    sidecar = {"base": model_identity(components), "pair": getattr(pair, "meta", {}),
               "negative_prompt": args.negative_prompt, "settings": config.to_dict(settings),
               "device": str(device), "dtype": str(components.unet.dtype).replace("torch.", ""),
               "images": records}
    (out / "settings.json").write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    logger.info("wrote %d images and settings.json to %s", len(records), out)
    return 0

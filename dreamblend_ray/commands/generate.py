"""``dreamblend generate``: DreamBlend images of a subject, as PNGs plus a JSON sidecar.

Either a subject from a fine-tuning output root (its manifest's recorded pair, or step overrides)::

    dreamblend generate --subject-root outputs/demo/storage --subject-id striped_star \\
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

from dreamblend_ray.dtypes import add_dtype_argument

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="embedded", help="base model: embedded, tiny, a directory or s3:// URI")
    source = parser.add_argument_group("the checkpoint pair (a subject, or two checkpoint URIs)")
    source.add_argument("--subject-root", help="output root of a fine-tuning run (local or s3://)")
    source.add_argument("--subject-id", help="subject id under --subject-root")
    source.add_argument("--guidance-step", type=int, default=None, help="override the manifest's G step")
    source.add_argument("--edit-step", type=int, default=None, help="override the manifest's E step")
    source.add_argument("--guidance-ckpt", help="G checkpoint directory URI (early, prompt-faithful)")
    source.add_argument("--edit-ckpt", help="E checkpoint directory URI (late, subject-faithful)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for more")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--alpha", type=float, default=0.25, help="DreamBlend strength (0: plain E)")
    parser.add_argument("--guidance-steps", type=int, default=None, help="K, guided first steps")
    parser.add_argument("--step-size", type=float, default=None, help="eta, the base latent step")
    parser.add_argument("--reference", action="store_true", help="also write G's reference images")
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampling call")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    add_dtype_argument(parser)
    parser.add_argument("--out", required=True, help="output directory for PNGs and settings.json")


def load_pair_from_args(args, components):
    from dreamblend_ray.training import checkpoints

    by_subject = args.subject_root or args.subject_id
    by_uri = args.guidance_ckpt or args.edit_ckpt
    if by_subject and by_uri:
        raise ValueError("give either --subject-root/--subject-id or --guidance-ckpt/--edit-ckpt, not both")
    if by_subject:
        if not (args.subject_root and args.subject_id):
            raise ValueError("--subject-root and --subject-id go together")
        pair, _ = checkpoints.load_pair(args.subject_root, args.subject_id, components,
                                        args.guidance_step, args.edit_step)
        return pair
    if not (args.guidance_ckpt and args.edit_ckpt):
        raise ValueError("give --guidance-ckpt and --edit-ckpt (or --subject-root and --subject-id)")
    return checkpoints.load_checkpoint_pair(components, args.guidance_ckpt, args.edit_ckpt)


def sampling_config(args):
    from dreamblend_ray.config import SamplingConfig

    extra = {} if args.step_size is None else {"step_size": args.step_size}
    return SamplingConfig(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          alpha=args.alpha, guidance_steps=args.guidance_steps,
                          return_reference=args.reference, **extra)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dreamblend_ray.models.components import load_components, model_identity, select_device, select_dtype
    from dreamblend_ray.config import check_range, to_dict
    from dreamblend_ray.method.sampler import DreamBlendSampler

    check_range("--num-images", args.num_images, 1, 64, integer=True)
    check_range("--batch-size", args.batch_size, 1, 256, integer=True)
    config = sampling_config(args)
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
        result = sampler.sample(pair, [p for p, _ in chunk], [s for _, s in chunk], config, negatives)
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
               "negative_prompt": args.negative_prompt, "settings": to_dict(config),
               "device": str(device), "dtype": str(components.unet.dtype).replace("torch.", ""),
               "images": records}
    (out / "settings.json").write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    logger.info("wrote %d images and settings.json to %s", len(records), out)
    return 0

"""`dreamblend finetune`: DreamBooth-fine-tune one subject into a checkpoint pair (issue #4).

Example::

    dreamblend finetune --base embedded --images ./photos --class-noun dog --subject-id rex \\
        --output s3://bucket/dreamblend --steps 400 --checkpoint-steps 100,200,400
"""

from __future__ import annotations

import argparse
import json

from dreamblend_ray.dtypes import mixed_precision_argument


def _steps_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not steps:
        raise argparse.ArgumentTypeError("expected at least one step")
    return steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="embedded",
                        help="base model: a diffusers directory, an s3:// URI, 'tiny' or 'embedded'")
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_URI",
                        help="instance images: directories (their top-level files) or image URIs")
    parser.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog")
    parser.add_argument("--subject-id", required=True, help="storage key of the subject ([A-Za-z0-9_-])")
    parser.add_argument("--output", required=True, help="output root: a local path or s3://bucket/prefix")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--checkpoint-steps", type=_steps_list, default=(),
                       help="comma-separated steps to save (the last step is always saved); "
                            "default 10%%, 25%%, 50%%, 75%%, 100%% of the run")
    group.add_argument("--checkpoint-every", type=int, default=None, help="save every N steps")
    parser.add_argument("--guidance-step", type=int, default=None,
                        help="default G checkpoint in the manifest (default: the saved step nearest 25%%)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--full", action="store_true", help="fine-tune the whole UNet instead of LoRA")
    parser.add_argument("--prior-images", type=int, default=50,
                        help="class images for the prior-preservation loss (default 50: ON, the DreamBooth "
                             "paper's recipe; diffusers' scripts default it off); 0 turns it off. Generated "
                             "once per base model and class noun, cached under OUTPUT/class_images/, and "
                             "each step then trains on a class image too (docs/finetuning.md: the cost)")
    parser.add_argument("--prior-loss-weight", type=float, default=1.0)
    parser.add_argument("--class-prompt", default=None, help="default: 'a photo of {class noun}'")
    parser.add_argument("--token", default="sks", help="rare identifier token (default sks)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="default: the base model's size")
    parser.add_argument("--mixed-precision", default="auto", type=mixed_precision_argument,
                        metavar="{auto,no,fp16,bf16}",
                        help="autocast on CUDA: auto (bf16 where supported, else fp16), no, fp16 or bf16 "
                             "(float16/bfloat16 accepted; fp32 means no)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace):
    from dreamblend_ray.config import FinetuneConfig

    prior = args.prior_images > 0
    return FinetuneConfig(
        method="full" if args.full else "lora", steps=args.steps, learning_rate=args.lr,
        batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum, seed=args.seed,
        rank=args.rank, lora_alpha=args.lora_alpha, token=args.token, prior_preservation=prior,
        num_class_images=args.prior_images, prior_loss_weight=args.prior_loss_weight,
        class_prompt=args.class_prompt, resolution=args.resolution,
        checkpoint_steps=args.checkpoint_steps, checkpoint_every=args.checkpoint_every,
        guidance_step=args.guidance_step, mixed_precision=args.mixed_precision, device=args.device)


def run(args: argparse.Namespace) -> int:
    from dreamblend_ray.training.layout import manifest_uri
    from dreamblend_ray.models.components import resolve_base
    from dreamblend_ray.config import validate_class_noun, validate_subject_id
    from dreamblend_ray.training.finetune import finetune_subject, image_uris

    config = config_from_args(args)
    validate_subject_id(args.subject_id)
    validate_class_noun(args.class_noun)
    base = resolve_base(args.base)
    manifest = finetune_subject(base, image_uris(args.images), args.class_noun, args.subject_id,
                                args.output, config, progress=not args.no_progress)
    summary = {key: manifest[key] for key in ("subject_id", "kind", "steps", "guidance_step", "edit_step")}
    summary["manifest"] = manifest_uri(args.output, args.subject_id)
    summary["final_loss"] = manifest["loss_curve"][-1]
    print(json.dumps(summary))
    return 0

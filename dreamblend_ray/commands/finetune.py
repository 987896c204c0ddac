"""`dreamblend finetune`: DreamBooth-fine-tune one subject into a checkpoint pair (issue #4).

Example::

    dreamblend finetune --base embedded --images ./photos --class-noun dog --subject-id rex \\
        --output s3://bucket/dreamblend --steps 400 --checkpoint-steps 100,200,400
"""

from __future__ import annotations

import argparse
import json

from dreamblend_ray import config
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.jobs.flags import add_base_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_base_argument(parser)
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_URI",
                        help="instance images: directories (their top-level files) or image URIs")
    parser.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog")
    parser.add_argument("--subject-id", required=True, help="storage key of the subject ([A-Za-z0-9_-])")
    parser.add_argument("--output", required=True, help="output root: a local path or a storage URI")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    settings = parser.add_argument_group(
        "fine-tuning settings",
        "Prior preservation is on by default (the DreamBooth paper's recipe; diffusers' scripts default it\n"
        "off): the class images are generated once per base model and class noun, cached under\n"
        "OUTPUT/class_images/, and each step then trains on a class image too (docs/finetuning.md: the cost).")
    config.add_arguments(settings, FinetuneConfig)
    older = parser.add_argument_group("older spellings", "kept working; the settings above say the same")
    older.add_argument("--full", action="store_true", help="--method full")
    older.add_argument("--prior-images", type=int, default=None, metavar="N",
                       help="--num-class-images N; 0 means --prior-preservation false")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    given = config.given_args(FinetuneConfig, args)
    if args.full:
        if given.get("method", "full") != "full":
            raise ValueError("--full contradicts --method " + given["method"])
        given["method"] = "full"
    if args.prior_images is not None:
        if "num_class_images" in given:
            raise ValueError("give --num-class-images or --prior-images, not both")
        given["num_class_images"] = args.prior_images
        if args.prior_images == 0:
            given.setdefault("prior_preservation", False)
    return FinetuneConfig(**given)


def run(args: argparse.Namespace) -> int:
    from dreamblend_ray.training.layout import manifest_uri
    from dreamblend_ray.models.components import resolve_base
    from dreamblend_ray.training.finetune import finetune_subject, image_uris

    settings = config_from_args(args)
    config.validate_subject_id(args.subject_id)
    config.validate_class_noun(args.class_noun)
    base = resolve_base(args.base)
    manifest = finetune_subject(base, image_uris(args.images), args.class_noun, args.subject_id,
                                args.output, settings, progress=not args.no_progress)
    summary = {key: manifest[key] for key in ("subject_id", "kind", "steps", "guidance_step", "edit_step")}
    summary["manifest"] = manifest_uri(args.output, args.subject_id)
    summary["final_loss"] = manifest["loss_curve"][-1]
    print(json.dumps(summary))
    return 0

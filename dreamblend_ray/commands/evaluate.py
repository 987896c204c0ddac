"""`dreamblend evaluate`: CLIP-I / CLIP-T / DINO / diversity on the DreamBooth protocol (issue #9).

Every subject of the list is sampled on its DreamBooth prompts (25 per kind, or the first
``--num-prompts``) and ``--seeds`` with its guidance checkpoint alone, its edit checkpoint alone and
DreamBlend at each ``--alphas``; see dreamblend_ray/jobs/evaluate.py for the outputs. Example::

    dreamblend evaluate --subjects s3://bucket/eval/subjects.jsonl --checkpoints s3://bucket/dreamblend \\
        --output s3://bucket/eval/run1 --base s3://bucket/models/sd15 \\
        --clip-model s3://bucket/models/clip-vit-large-patch14 --dino-model s3://bucket/models/dino-vits16

The same arguments drive the Ray job ``jobs/evaluate.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dreamblend_ray import config
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.dtypes import add_dtype_argument
from dreamblend_ray.jobs.flags import LOG_LEVELS, RESOURCE_DEFAULTS, add_base_argument, add_resource_arguments
from dreamblend_ray.runtime import exit_codes, lifecycle

logger = logging.getLogger(__name__)

# alpha is set per method (--alphas), reference images are not scored, layers is nested.
SAMPLING_FLAGS = [name for name in config.settings_of(SamplingConfig)
                  if name not in ("alpha", "return_reference", "layers")]


def _list(kind, text: str):
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", required=True,
                        help="subject list (JSON Lines: id, class_noun, kind live|object, image_dir), "
                             "a local path or s3:// URI")
    parser.add_argument("--checkpoints", required=True,
                        help="root the subjects were fine-tuned into (holds subjects/{id}/subject.json)")
    parser.add_argument("--output", required=True, help="output directory or s3:// prefix")
    parser.add_argument("--clip-model", default=None,
                        help="CLIPModel directory or s3:// URI (transformers layout; never downloaded)")
    parser.add_argument("--dino-model", default=None,
                        help="self-supervised ViTModel (DINO ViT-S/16) directory or s3:// URI")
    add_base_argument(parser)
    parser.add_argument("--alphas", type=lambda t: _list(float, t), default=(0.1, 0.25, 0.5),
                        help="DreamBlend strengths to evaluate (default 0.1,0.25,0.5)")
    parser.add_argument("--seeds", type=lambda t: _list(int, t), default=(0, 1, 2, 3),
                        help="seeds per prompt (default 0,1,2,3; diversity needs two or more)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="use the first N of the 25 DreamBooth prompts (default all)")
    parser.add_argument("--guidance-step", type=int, default=None,
                        help="override every subject's recorded guidance checkpoint")
    parser.add_argument("--edit-step", type=int, default=None,
                        help="override every subject's recorded edit checkpoint")
    parser.add_argument("--grid-prompts", type=int, default=8, help="prompts (columns) per grid")
    add_resource_arguments(parser, ("num_actors", "gpus_per_actor"))
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    add_dtype_argument(parser)
    parser.add_argument("--no-ray", action="store_true",
                        help="run in this process without Ray (debugging, small runs)")
    config.add_arguments(parser.add_argument_group("sampling settings", "the same for every method"),
                         SamplingConfig, SAMPLING_FLAGS)


def config_from_args(args: argparse.Namespace):
    from dreamblend_ray.jobs.evaluate import EvalConfig

    sampling = config.from_args(SamplingConfig, args, SAMPLING_FLAGS)
    return EvalConfig(alphas=tuple(args.alphas), seeds=tuple(args.seeds), num_prompts=args.num_prompts,
                      guidance_step=args.guidance_step, edit_step=args.edit_step, sampling=sampling,
                      grid_prompts=args.grid_prompts)


def run(args: argparse.Namespace) -> int:
    from dreamblend_ray.jobs.evaluate import run_evaluation

    settings = config_from_args(args)
    actors = RESOURCE_DEFAULTS["num_actors"] if args.num_actors is None else args.num_actors
    gpus = RESOURCE_DEFAULTS["gpus_per_actor"] if args.gpus_per_actor is None else args.gpus_per_actor
    if not args.no_ray:
        lifecycle.init_ray(args.address)
    report = run_evaluation(args.subjects, args.checkpoints, args.output, args.clip_model, args.dino_model,
                            base=args.base, config=settings, use_ray=not args.no_ray, actors=actors,
                            gpus_per_actor=gpus, device=args.device, dtype=args.dtype)
    logger.info("results table: %s", report["outputs"]["table"])
    sys.stdout.write(open_table(report["outputs"]["table"]))
    return 0


def open_table(uri: str) -> str:
    from dreamblend_ray.io import storage

    return storage.read_text(uri)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``jobs/evaluate.py``: the arguments of ``dreamblend evaluate``."""
    parser = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=list(LOG_LEVELS))
    add_arguments(parser)
    lifecycle.add_arguments(parser)
    return exit_codes.document(parser)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/evaluate.py`` (same arguments as ``dreamblend evaluate``)."""
    args = build_parser().parse_args(argv)
    return lifecycle.main("evaluate-job", args, lambda: run_from_args(args))


def run_from_args(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return exit_codes.USAGE

"""The command lines of the batch jobs: ``jobs/finetune_subjects.py`` and ``jobs/generate_batch.py``,
also run as ``python -m dreamblend_ray.job_entry finetune|generate`` (what ``dreamblend submit`` runs).

Every fine-tuning and sampling setting is a flag named after its field, derived from config.py
(``config.add_arguments``), as in ``dreamblend finetune|generate``; the flags the jobs share
(``--base``, ``--address``, the actor pool) from jobs/flags.py. So each setting has one flag
name, one default and one range everywhere, and the help shows them.
"""

from __future__ import annotations

import argparse
import json
import logging

from dreamblend_ray import config
from dreamblend_ray.config import FinetuneConfig, SamplingConfig
from dreamblend_ray.dtypes import add_dtype_argument
from dreamblend_ray.evaluation.pair_choice import SCORERS, PairChoiceOptions
from dreamblend_ray.io import storage
from dreamblend_ray.jobs.common import JobResources
from dreamblend_ray.jobs.flags import (LOG_LEVELS, add_base_argument, add_resource_arguments, add_tenant_argument,
                                      given_resources)
from dreamblend_ray.training.layout import tenant_root
from dreamblend_ray.jobs.finetune import FinetuneJobResult, gather_results, run_finetune_job
from dreamblend_ray.jobs.generate import BATCH_SIZE, MAX_IMAGES_PER_TASK, run_generate_job
from dreamblend_ray.runtime import exit_codes, lifecycle

logger = logging.getLogger(__name__)

# FinetuneConfig.device is where a base loaded by the caller trains; the job's actors load their own
# (on a GPU with --gpus-per-actor).
FINETUNE_FLAGS = [name for name in config.settings_of(FinetuneConfig) if name != "device"]
# layers is nested (--settings-json takes it); the job writes no reference images.
SAMPLING_FLAGS = [name for name in config.settings_of(SamplingConfig) if name not in ("layers", "return_reference")]


def json_object(text: str, flag: str) -> dict:
    """The JSON object ``text`` given to ``flag``; ValueError with one sentence otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--log-level", default="INFO", choices=list(LOG_LEVELS))
    return parser


def finish(parser: argparse.ArgumentParser, what: str) -> argparse.ArgumentParser:
    parser.add_argument("--allow-failures", action="store_true",
                        help=f"exit 0 even when some {what} failed (they are in the results table)")
    lifecycle.add_arguments(parser)
    return exit_codes.document(parser, exit_codes.PARTIAL)


# --------------------------------------------------------------------------- fine-tuning job

def finetune_parser() -> argparse.ArgumentParser:
    parser = job_parser("jobs/finetune_subjects.py",
                        "Fine-tune every subject of a manifest (JSONL/Parquet) on a Ray Data actor pool.")
    parser.add_argument("--subjects", help="subjects manifest URI (.jsonl or .parquet); required unless --gather")
    parser.add_argument("--output", required=True, help="output root (local path or storage URI)")
    parser.add_argument("--run-id", help="name of this run's folder under {output}/runs/ (default: time-based)")
    parser.add_argument("--gather", action="store_true",
                        help="start nothing: gather the saved rows of run --run-id (e.g. one whose driver died) "
                             "into its results.parquet; subjects without a row become failed rows")
    add_base_argument(parser)
    add_tenant_argument(parser)
    add_resource_arguments(parser)
    settings = parser.add_argument_group(
        "fine-tuning settings", "for every subject; a manifest row's \"finetune\" object overrides them.\n"
        "Prior preservation is on by default (docs/finetuning.md: why, and the cost).")
    config.add_arguments(settings, FinetuneConfig, FINETUNE_FLAGS)
    settings.add_argument("--config-json", default="{}",
                          help="FinetuneConfig fields as a JSON object; the flags above win over it")
    add_pair_choice_arguments(parser)
    return finish(parser, "subjects")


def add_pair_choice_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("automatic pair choice",
                                      "score each subject's checkpoints and record the chosen pair in subject.json")
    group.add_argument("--choose-pair", choices=list(SCORERS),
                       help="scorer: embedded (analytic metrics of the embedded model), clip-dino (CLIP-T and "
                            "DINO; needs --clip-model and --dino-model) or attention (the collapse probe's scores, "
                            "no images; see --attention-probe); default: keep the configured pair")
    group.add_argument("--clip-model", help="CLIP model directory or storage URI (transformers layout)")
    group.add_argument("--dino-model", help="DINO ViT model directory or storage URI (transformers layout)")
    group.add_argument("--choice-prompts", type=int, help="validation prompts per subject (default 4)")
    group.add_argument("--choice-tolerance", type=float,
                       help="relative prompt-fidelity tolerance for the guidance step (default 0.1)")
    group.add_argument("--choice-context", choices=("companion", "background"),
                       help="embedded scorer: prompts add a second object (default) or a new background")
    group.add_argument("--attention-probe", action="store_true",
                       help="measure attention collapse on each subject's checkpoints and the base model "
                            "(subject.json attention_probe, subjects/{id}/collapse.png, result columns)")


def pair_choice_from_args(args: argparse.Namespace) -> PairChoiceOptions | None:
    extra = {"--clip-model": args.clip_model, "--dino-model": args.dino_model,
             "--choice-prompts": args.choice_prompts, "--choice-tolerance": args.choice_tolerance,
             "--choice-context": args.choice_context}
    if args.choose_pair is None:
        given = [flag for flag, value in extra.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) --choose-pair")
        return None
    fields = {"clip_model": args.clip_model, "dino_model": args.dino_model, "num_prompts": args.choice_prompts,
              "tolerance": args.choice_tolerance, "context": args.choice_context}
    return PairChoiceOptions(args.choose_pair, **{k: v for k, v in fields.items() if v is not None})


def finetune_config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The job's FinetuneConfig: --config-json with the flags given on top, validated once (an
    unknown key is an error naming it)."""
    overrides = json_object(args.config_json, "--config-json")
    return config.from_dict(FinetuneConfig, {**overrides, **config.given_args(FinetuneConfig, args, FINETUNE_FLAGS)})


def finetune_job_from_args(args: argparse.Namespace) -> FinetuneJobResult:
    output = tenant_root(args.output, args.tenant)
    if args.gather:
        if not args.run_id:
            raise ValueError("--gather needs --run-id (the folder under {output}/runs/ to read)")
        return gather_results(output, args.run_id)
    if not args.subjects:
        raise ValueError("--subjects is required (or --gather --run-id ID to read an earlier run)")
    return run_finetune_job(args.subjects, output, base=args.base, config=finetune_config_from_args(args),
                            resources=JobResources(**given_resources(args)), run_id=args.run_id,
                            address=args.address, pair_choice=pair_choice_from_args(args),
                            attention_probe=args.attention_probe)


def run_finetune_from_args(args: argparse.Namespace) -> int:
    try:
        result = finetune_job_from_args(args)
    except (ValueError, FileNotFoundError, storage.StorageError) as exc:
        logger.error("%s", exc)
        return exit_codes.USAGE
    return exit_codes.OK if result.ok or args.allow_failures else exit_codes.PARTIAL


def finetune_main(argv: list[str] | None = None) -> int:
    args = finetune_parser().parse_args(argv)
    return lifecycle.main("finetune-job", args, lambda: run_finetune_from_args(args))


# --------------------------------------------------------------------------- generation job

def generate_parser() -> argparse.ArgumentParser:
    parser = job_parser("jobs/generate_batch.py",
                        "DreamBlend images for rows of (subject_id, prompt, seed, num_images, settings).")
    parser.add_argument("--requests", required=True, help="requests URI (.jsonl or .parquet)")
    parser.add_argument("--output", required=True, help="output root for images/ and runs/")
    parser.add_argument("--checkpoints", help="root the subjects were fine-tuned into (default: --output)")
    parser.add_argument("--run-id", help="name of this run's folder under {output}/runs/")
    add_base_argument(parser)
    add_tenant_argument(parser)
    add_resource_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"images per sampler call (default {BATCH_SIZE})")
    parser.add_argument("--max-images-per-task", type=int, default=MAX_IMAGES_PER_TASK,
                        help=f"split a subject's rows into tasks of at most this many images "
                             f"(default {MAX_IMAGES_PER_TASK})")
    settings = parser.add_argument_group("sampling settings",
                                         "for every row; a request row's \"settings\" object overrides them.")
    config.add_arguments(settings, SamplingConfig, SAMPLING_FLAGS)
    settings.add_argument("--settings-json", default="{}",
                          help="SamplingConfig fields as a JSON object (layers too); the flags above win over it")
    add_dtype_argument(parser)
    return finish(parser, "images")


def sampling_config_from_args(args: argparse.Namespace) -> SamplingConfig:
    """The job's SamplingConfig: --settings-json with the flags given on top, validated once (an
    unknown key is an error naming it)."""
    settings = json_object(args.settings_json, "--settings-json")
    return config.from_dict(SamplingConfig, {**settings, **config.given_args(SamplingConfig, args, SAMPLING_FLAGS)})


def run_generate_from_args(args: argparse.Namespace) -> int:
    try:
        output = tenant_root(args.output, args.tenant)
        checkpoints_root = tenant_root(args.checkpoints, args.tenant) if args.checkpoints else None
        result = run_generate_job(args.requests, output, checkpoints_root=checkpoints_root, base=args.base,
                                  settings=sampling_config_from_args(args), batch_size=args.batch_size,
                                  max_images_per_task=args.max_images_per_task,
                                  resources=JobResources(**given_resources(args)), run_id=args.run_id, address=args.address,
                                  dtype=args.dtype)
    except (ValueError, FileNotFoundError, storage.StorageError) as exc:
        logger.error("%s", exc)
        return exit_codes.USAGE
    return exit_codes.OK if result.failed == 0 or args.allow_failures else exit_codes.PARTIAL


def generate_main(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    return lifecycle.main("generate-job", args, lambda: run_generate_from_args(args))


# The jobs by the name ``job_entry`` and ``dreamblend submit`` give them.
MAINS = {"finetune": finetune_main, "generate": generate_main}
PARSERS = {"finetune": finetune_parser, "generate": generate_parser}

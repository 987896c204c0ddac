"""``dreamblend generate``: DreamBlend images of a subject, as PNGs plus a JSON sidecar.

Either a subject from a fine-tuning output root (its manifest's recorded pair, or step overrides)::

    dreamblend generate --checkpoints outputs/demo/storage --subject-id striped_star \\
        --prompt "a photo of sks star on a green background" --seed 0 --alpha 0.25 --out outputs/gen

``--base`` defaults to the base the subject's subject.json records (``commands.subject_base``);
or two checkpoint directories (LoRA or full fine-tune) given directly, with their base::

    dreamblend generate --base embedded --guidance-ckpt ROOT/subjects/x/checkpoints/step-100 \\
        --edit-ckpt ROOT/subjects/x/checkpoints/step-400 --prompt "..." --out outputs/gen
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dreamblend_ray import config
from dreamblend_ray.commands.subject_base import add_base_argument, resolve_base_arg
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.dtypes import add_dtype_argument

logger = logging.getLogger(__name__)

# layers is nested: the settings.json of a run, the HTTP API and the generation job take it.
SAMPLING_FLAGS = [name for name in config.settings_of(SamplingConfig) if name != "layers"]
# The heat-map rows and the suffixes of their images' file names (NNNN-g.png, ...).
ROW_FILES = {"guidance": "g", "edit": "e", "dreamblend": "dreamblend"}


def add_arguments(parser: argparse.ArgumentParser, sampling_flags: list[str] = SAMPLING_FLAGS) -> None:
    """The pair sources, prompts, seeds, device and output folder, and the sampling flags
    ``sampling_flags`` (``dreamblend attention`` takes the same, less ``--attention-maps``)."""
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
    config.add_arguments(parser.add_argument_group("sampling settings"), SamplingConfig, sampling_flags)


def check_pair_source(args: argparse.Namespace) -> bool:
    """Whether the pair is a subject (``--checkpoints``/``--subject-id``, True) or two checkpoint
    URIs (False); ValueError for a mix or a half of either (checked before any model loads)."""
    by_subject = args.checkpoints or args.subject_id
    by_uri = args.guidance_ckpt or args.edit_ckpt
    if by_subject and by_uri:
        raise ValueError("give either --checkpoints/--subject-id or --guidance-ckpt/--edit-ckpt, not both")
    if by_subject:
        if not (args.checkpoints and args.subject_id):
            raise ValueError("--checkpoints and --subject-id go together")
        return True
    if not (args.guidance_ckpt and args.edit_ckpt):
        raise ValueError("give --guidance-ckpt and --edit-ckpt (or --checkpoints and --subject-id)")
    return False


def load_pair_from_args(args, components):
    # Deferred: training.checkpoints imports torch.
    from dreamblend_ray.training import checkpoints

    if check_pair_source(args):
        pair, _ = checkpoints.load_pair(args.checkpoints, args.subject_id, components,
                                        args.guidance_step, args.edit_step)
        return pair
    return checkpoints.load_checkpoint_pair(components, args.guidance_ckpt, args.edit_ckpt)



@dataclass
class Session:
    """What a sampling command loaded: the model, the pair, the device and the output folder."""

    components: object
    pair: object
    device: object
    out: Path


def open_session(args: argparse.Namespace) -> Session:
    """Checks the counts and the pair's source, loads the base model (``--base``, else the
    subject's own) and the pair, makes the output folder."""
    # Deferred: these import torch and diffusers, and `dreamblend --help` must stay instant.
    from dreamblend_ray.models.components import load_components, select_device, select_dtype

    config.check_range("--num-images", args.num_images, 1, 64, integer=True)
    config.check_range("--batch-size", args.batch_size, 1, 256, integer=True)
    check_pair_source(args)
    base = resolve_base_arg(args)
    device = select_device(args.device)
    components = load_components(base, device=device, dtype=select_dtype(device, args.dtype))
    pair = load_pair_from_args(args, components)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return Session(components, pair, device, out)


def sample_batches(session: Session, args: argparse.Namespace, settings: SamplingConfig, desc: str):
    """Yields ``(start, chunk, result)``: one sampler call per ``--batch-size`` chunk of the
    (prompt, seed) jobs; the distance is tracked whenever heat maps are asked for."""
    # Deferred: tqdm and the sampler (torch) stay out of `--help`.
    from tqdm import tqdm

    from dreamblend_ray.method.sampler import DreamBlendSampler

    jobs = [(p, args.seed + k) for p in args.prompt for k in range(args.num_images)]
    sampler = DreamBlendSampler(session.components)
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=desc, unit="batch"):
        chunk = jobs[start:start + args.batch_size]
        negatives = None if args.negative_prompt is None else [args.negative_prompt] * len(chunk)
        result = sampler.sample(session.pair, [p for p, _ in chunk], [s for _, s in chunk], settings, negatives,
                                track_distance=settings.attention_maps)
        yield start, chunk, result


def attention_reports_of(session: Session, result, chunk) -> list:
    """The chunk's per-sample heat-map reports (``heatmap_report.reports_from``)."""
    # Deferred: heatmap_report imports torch.
    from dreamblend_ray.method.heatmap_report import reports_from

    components = session.components
    return reports_from(result, [p for p, _ in chunk], [s for _, s in chunk],
                        *components.model_family.map_tokens(components))


def write_attention_files(out: Path, stem: str, report, written: dict | None = None) -> dict:
    """One sample's heat maps: ``{stem}-attention.png`` (the grid), ``{stem}-attention.json``
    (``report.to_json()`` and the images' file names) and each row's image as ``{stem}-g.png``,
    ``{stem}-e.png``, ``{stem}-dreamblend.png``, unless ``written`` names a file already holding it.
    Returns the names written, for the command's summary."""
    images = {row: (written or {}).get(row) or f"{stem}-{suffix}.png" for row, suffix in ROW_FILES.items()}
    for row, name in images.items():
        if row not in (written or {}):
            report.images[row].save(out / name)
    names = {"attention_grid": f"{stem}-attention.png", "attention_json": f"{stem}-attention.json"}
    report.grid().save(out / names["attention_grid"])
    document = {**report.to_json(), "images": images, "grid": names["attention_grid"]}
    (out / names["attention_json"]).write_text(json.dumps(document) + "\n")
    return {**names, "images": images}


def write_sidecar(session: Session, args: argparse.Namespace, settings: SamplingConfig, key: str,
                  records: list[dict]) -> None:
    """``settings.json``: the base model, the pair, the settings, and one record per sample."""
    # Deferred: models.components imports torch.
    from dreamblend_ray.models.components import model_identity

    components = session.components
    sidecar = {"base": model_identity(components), "pair": getattr(session.pair, "meta", {}),
               "negative_prompt": args.negative_prompt, "settings": config.to_dict(settings),
               "device": str(session.device), "dtype": str(components.denoiser.dtype).replace("torch.", ""),
               key: records}
    (session.out / "settings.json").write_text(json.dumps(sidecar, indent=2, default=str) + "\n")


def run(args: argparse.Namespace) -> int:
    settings = config.from_args(SamplingConfig, args, SAMPLING_FLAGS)
    session = open_session(args)
    records = []
    for start, chunk, result in sample_batches(session, args, settings, "generate"):
        reports = attention_reports_of(session, result, chunk) if settings.attention_maps else None
        for i, (prompt, seed) in enumerate(chunk):
            index = start + i
            record = {"index": index, "prompt": prompt, "seed": seed, "image": f"{index:04d}.png",
                      "seconds": result.seconds / len(chunk)}
            result.images[i].save(session.out / record["image"])
            if result.reference_images is not None:
                record["reference_image"] = f"{index:04d}-reference.png"
                result.reference_images[i].save(session.out / record["reference_image"])
            if result.attention_distance.numel():
                record["mean_attention_distance"] = float(result.attention_distance[i].mean())
            if reports is not None:
                written = {"dreamblend": record["image"]}
                if "reference_image" in record:  # always, with heat maps on: G's images come back
                    written["guidance"] = record["reference_image"]
                record.update(write_attention_files(session.out, f"{index:04d}", reports[i], written))
            records.append(record)
    write_sidecar(session, args, settings, "images", records)
    logger.info("wrote %d images and settings.json to %s", len(records), session.out)
    return 0

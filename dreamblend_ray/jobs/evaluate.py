"""The DreamBooth-protocol evaluation: subjects x prompts x seeds, each checkpoint alone and DreamBlend.

For every subject (a line of the subject list, see :mod:`dreamblend_ray.evaluation.protocol`) and every prompt
template of its kind, each seed is sampled with

- ``guidance``: the guidance checkpoint G alone (G == E, alpha 0: plain sampling of G),
- ``edit``: the edit checkpoint E alone (G == E, alpha 0: plain sampling of E, i.e. plain DreamBooth),
- ``dreamblend``: E guided by G, once per alpha in ``EvalConfig.alphas``,

all from the same initial noise per seed. Every image gets CLIP-I and DINO (against the subject's
real images, mean over them), CLIP-T (against the prompt without the identifier token) and, per
(subject, prompt, method), the diversity of its seeds. Outputs under ``output``:

- ``scores.parquet``: one row per image (see :data:`ROW_COLUMNS`),
- ``results.md`` / ``summary.json``: one row per method, laid out like a paper's results table,
- ``grids/{subject_id}.png``: rows = methods, columns = prompts (first seed),
- ``images/{subject_id}/{method}/p{prompt:02d}-s{seed}.png``: every generated image.

The unit of work is one (subject, prompt) with all its seeds and methods, so diversity is computed
where the images are. :func:`run_evaluation` runs the units through Ray Data (``map_batches`` with
one :class:`Evaluator` actor per device) or inline.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dreamblend_ray.evaluation import protocol as benchmark

from dreamblend_ray.io import storage
from dreamblend_ray.io.images import encode_png
from dreamblend_ray.runtime import lifecycle
from dreamblend_ray.training import layout
from dreamblend_ray.config import MAX_SEED, SamplingConfig, check_range, to_dict

logger = logging.getLogger(__name__)

METHOD_ORDER = ("guidance", "edit", "dreamblend")
ROW_COLUMNS = ("subject_id", "class_noun", "kind", "method", "label", "alpha", "guidance_step",
               "edit_step", "prompt_index", "prompt", "plain_prompt", "seed", "dino", "clip_i",
               "clip_t", "diversity", "attention_distance", "image_uri", "seconds")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run.

    alphas: the DreamBlend strengths evaluated (each > 0; alpha 0 is the "edit" row already).
    seeds: the seeds sampled per (subject, prompt); diversity needs at least two.
    num_prompts: the first N templates of the kind's 25 (None: all 25).
    guidance_step / edit_step: override every subject's recorded pair (None: use subject.json).
    sampling: the sampling settings; its alpha is replaced per method.
    grid_prompts: how many prompts (columns) the per-subject grid shows.
    """

    alphas: tuple[float, ...] = (0.1, 0.25, 0.5)
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    num_prompts: int | None = None
    guidance_step: int | None = None
    edit_step: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    grid_prompts: int = 8

    def __post_init__(self):
        if not self.alphas:
            raise ValueError("alphas must list at least one DreamBlend strength")
        for alpha in self.alphas:
            check_range("alphas", alpha, 1e-6, 10.0)
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        for seed in self.seeds:
            check_range("seeds", seed, 0, MAX_SEED, integer=True)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if self.num_prompts is not None:
            check_range("num_prompts", self.num_prompts, 1, 25, integer=True)
        for name in ("guidance_step", "edit_step"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 0, None, integer=True)
        if not isinstance(self.sampling, SamplingConfig):
            raise ValueError("sampling must be a SamplingConfig")
        check_range("grid_prompts", self.grid_prompts, 1, 25, integer=True)

    def methods(self) -> list[tuple[str, float]]:
        """(method, alpha) in table order."""
        return [("guidance", 0.0), ("edit", 0.0)] + [("dreamblend", float(a)) for a in self.alphas]

    def to_json(self) -> dict:
        return to_dict(self)


def method_label(method: str, alpha: float) -> str:
    if method == "guidance":
        return "Guidance checkpoint G alone"
    if method == "edit":
        return "Edit checkpoint E alone (DreamBooth)"
    return f"DreamBlend (alpha={alpha:g})"


def method_key(method: str, alpha: float) -> str:
    """A storage-safe name for a method: guidance, edit, dreamblend-a0.25."""
    return method if method != "dreamblend" else f"dreamblend-a{alpha:g}"


# --------------------------------------------------------------------------- units of work

def subject_tasks(subject: benchmark.EvalSubject, manifest: dict, config: EvalConfig) -> list[dict]:
    """One task per prompt of ``subject``; the pair comes from ``manifest`` unless overridden."""
    guidance_step = config.guidance_step if config.guidance_step is not None else manifest.get("guidance_step")
    edit_step = config.edit_step if config.edit_step is not None else manifest.get("edit_step")
    if guidance_step is None or edit_step is None:
        raise ValueError(f"subject {subject.id}: subject.json records no guidance_step/edit_step; "
                         "pass --guidance-step and --edit-step")
    token = manifest.get("token")
    if not token:
        raise ValueError(f"subject {subject.id}: subject.json records no identifier token")
    prompts, plain = benchmark.prompts_for(subject.kind, subject.class_noun, token, config.num_prompts)
    return [{"subject_id": subject.id, "class_noun": subject.class_noun, "kind": subject.kind,
             "image_dir": subject.image_dir, "guidance_step": int(guidance_step),
             "edit_step": int(edit_step), "prompt_index": i, "prompt": p, "plain_prompt": q}
            for i, (p, q) in enumerate(zip(prompts, plain))]


def build_tasks(subjects: list[benchmark.EvalSubject], checkpoints_root: str, config: EvalConfig) -> list[dict]:
    """All (subject, prompt) tasks; ValueError when a subject has no complete checkpoint pair."""
    tasks = []
    for subject in subjects:
        try:
            manifest = layout.read_manifest(checkpoints_root, subject.id)
        except FileNotFoundError as exc:
            raise ValueError(f"subject {subject.id}: no subject.json under {checkpoints_root} "
                             "(fine-tune it first)") from exc
        tasks.extend(subject_tasks(subject, manifest, config))
    return tasks


# --------------------------------------------------------------------------- the worker

def alone(pair, which: str):
    """A pair whose G and E are both ``pair``'s G (``which="guidance"``) or E (``"edit"``)."""
    from dreamblend_ray.method.pair import AdapterPair, TwoUNetPair

    if isinstance(pair, AdapterPair):
        name = pair.guidance_adapter if which == "guidance" else pair.edit_adapter
        return AdapterPair(pair.unet, name, name, dict(pair.meta))
    if isinstance(pair, TwoUNetPair):
        unet = pair.guidance_unet if which == "guidance" else pair.edit_unet
        return TwoUNetPair(unet, unet, dict(pair.meta))
    raise ValueError(f"unsupported pair type {type(pair).__name__}")


class Evaluator:
    """Generates and scores tasks; one instance per device (a Ray Data actor or inline).

    Holds the base components, the sampler, the CLIP and DINO scorers, the current subject's pair
    (unloaded when the subject changes) and its real-image embeddings.
    """

    def __init__(self, base: str, checkpoints_root: str, output: str, clip_model: str,
                 dino_model: str, config: EvalConfig, device: str | None = None,
                 dtype: str | None = None):
        from dreamblend_ray.evaluation import metrics
        from dreamblend_ray.models.components import load_components, select_device, select_dtype
        from dreamblend_ray.method.sampler import DreamBlendSampler

        dev = select_device(device)
        self.components = load_components(base, device=dev, dtype=select_dtype(dev, dtype))
        self.sampler = DreamBlendSampler(self.components)
        self.clip = metrics.load_clip(clip_model, device=dev)
        self.dino = metrics.load_dino(dino_model, device=dev)
        self.root, self.output, self.config = checkpoints_root, output, config
        self._subject, self._pair, self._real = None, None, None

    def _use_subject(self, task: dict) -> None:
        from dreamblend_ray.training import checkpoints

        key = (task["subject_id"], task["guidance_step"], task["edit_step"])
        if self._subject == key:
            return
        if self._pair is not None:
            checkpoints.unload_pair(self._pair, self.components)
            self._pair = None
        self._pair, _ = checkpoints.load_pair(self.root, task["subject_id"], self.components,
                                              guidance_step=task["guidance_step"],
                                              edit_step=task["edit_step"])
        real = benchmark.load_images(task["image_dir"])
        self._real = {"clip": self.clip.image_embeddings(real), "dino": self.dino.image_embeddings(real)}
        self._subject = key

    def _pair_for(self, method: str):
        return self._pair if method == "dreamblend" else alone(self._pair, method)

    def score(self, images, plain_prompt: str) -> dict:
        """Per-image DINO, CLIP-I (mean over the real images), CLIP-T, and the group's diversity."""
        from dreamblend_ray.evaluation import metrics

        clip_emb = self.clip.image_embeddings(images)
        dino_emb = self.dino.image_embeddings(images)
        text_emb = self.clip.text_embeddings([plain_prompt])
        return {"dino": metrics.cosine_matrix(dino_emb, self._real["dino"]).mean(dim=1).tolist(),
                "clip_i": metrics.cosine_matrix(clip_emb, self._real["clip"]).mean(dim=1).tolist(),
                "clip_t": (clip_emb @ text_emb.T)[:, 0].tolist(),
                "diversity": metrics.mean_pairwise_distance(dino_emb)}

    def evaluate_task(self, task: dict) -> list[dict]:
        """All methods x seeds of one (subject, prompt): one row per image."""
        task = {k: (v.item() if hasattr(v, "item") else v) for k, v in task.items()}
        self._use_subject(task)
        seeds = list(self.config.seeds)
        common = {k: task[k] for k in ("subject_id", "class_noun", "kind", "guidance_step", "edit_step",
                                       "prompt_index", "prompt", "plain_prompt")}
        rows = []
        for method, alpha in self.config.methods():
            sampling = dataclasses.replace(self.config.sampling, alpha=alpha, return_reference=False)
            result = self.sampler.sample(self._pair_for(method), [task["prompt"]] * len(seeds),
                                         seeds, sampling)
            scores, dist = self.score(result.images, task["plain_prompt"]), result.attention_distance
            for b, seed in enumerate(seeds):
                uri = storage.join(self.output, "images", task["subject_id"], method_key(method, alpha),
                                   f"p{task['prompt_index']:02d}-s{seed}.png")
                storage.write_bytes(uri, encode_png(result.images[b]))
                rows.append({**common, "method": method, "label": method_label(method, alpha),
                             "alpha": alpha, "seed": seed, "dino": scores["dino"][b],
                             "clip_i": scores["clip_i"][b], "clip_t": scores["clip_t"][b],
                             "diversity": scores["diversity"],
                             "attention_distance": float(dist[b].mean()) if dist.numel() else math.nan,
                             "image_uri": uri, "seconds": result.seconds / len(seeds)})
        return rows

    def __call__(self, batch):
        """Ray Data ``map_batches`` entry point (pandas batches of tasks -> rows of images)."""
        import pandas as pd

        rows = []
        for task in batch.to_dict("records"):
            rows.extend(self.evaluate_task(task))
        return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


# --------------------------------------------------------------------------- tables and grids

def summarize(rows: list[dict]) -> list[dict]:
    """One row per (method, alpha) in table order: mean DINO, CLIP-I, CLIP-T, diversity, counts.

    diversity is averaged over (subject, prompt) groups, NaN when every group has a single seed.
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    out = []
    for (method, alpha), group in df.groupby(["method", "alpha"], sort=False):
        per_group = group.groupby(["subject_id", "prompt_index"])["diversity"].first()
        out.append({"method": method, "alpha": float(alpha), "label": method_label(method, alpha),
                    "dino": float(group["dino"].mean()), "clip_i": float(group["clip_i"].mean()),
                    "clip_t": float(group["clip_t"].mean()),
                    "diversity": float(per_group.mean()) if per_group.notna().any() else math.nan,
                    "images": int(len(group)), "subjects": int(group["subject_id"].nunique())})
    out.sort(key=lambda r: (METHOD_ORDER.index(r["method"]), r["alpha"]))
    return out


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_table(summary: list[dict], title: str | None = None) -> str:
    """A results table like the papers' (higher is better for every column)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | Diversity ↑ | Images |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r['label']} | {_fmt(r['dino'])} | {_fmt(r['clip_i'])} | {_fmt(r['clip_t'])} "
                     f"| {_fmt(r['diversity'])} | {r['images']} |")
    return "\n".join(lines) + "\n"


def image_grid(rows: list[dict], subject_id: str, max_prompts: int = 8, label_width: int = 180,
               min_tile: int = 96):
    """PNG grid of one subject: one row per method, one column per prompt (the first seed).

    Tiles smaller than ``min_tile`` pixels are enlarged (nearest neighbour) so labels fit.
    """
    from PIL import Image, ImageDraw

    mine = [r for r in rows if r["subject_id"] == subject_id]
    if not mine:
        raise ValueError(f"no rows for subject {subject_id!r}")
    first_seed = min(r["seed"] for r in mine)
    prompts = sorted({r["prompt_index"] for r in mine})[:max_prompts]
    methods = sorted({(r["method"], r["alpha"]) for r in mine},
                     key=lambda m: (METHOD_ORDER.index(m[0]), m[1]))
    cells = {(r["method"], r["alpha"], r["prompt_index"]): r["image_uri"]
             for r in mine if r["seed"] == first_seed}
    width, height = Image.open(io.BytesIO(storage.read_bytes(next(iter(cells.values()))))).size
    scale = max(1, math.ceil(min_tile / min(width, height)))
    size = (width * scale, height * scale)
    grid = Image.new("RGB", (label_width + size[0] * len(prompts), size[1] * len(methods)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (method, alpha) in enumerate(methods):
        draw.text((4, row * size[1] + 4), method_label(method, alpha), fill="black")
        for col, prompt_index in enumerate(prompts):
            uri = cells.get((method, alpha, prompt_index))
            if uri is not None:
                tile = Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")
                grid.paste(tile.resize(size, Image.NEAREST), (label_width + col * size[0], row * size[1]))
    return grid


def write_outputs(rows: list[dict], output: str, config: EvalConfig) -> dict:
    """scores.parquet, summary.json, results.md and one grid per subject; returns the summary dict."""
    if not rows:
        raise ValueError("the evaluation produced no rows")
    table = pa.Table.from_pylist([{k: r[k] for k in ROW_COLUMNS} for r in rows])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(output, "scores.parquet"), sink.getvalue().to_pybytes())
    summary = summarize(rows)
    subjects = sorted({r["subject_id"] for r in rows})
    per_subject = {s: summarize([r for r in rows if r["subject_id"] == s]) for s in subjects}
    text = markdown_table(summary, title=f"All subjects ({len(subjects)})")
    steps = {r["subject_id"]: (r["guidance_step"], r["edit_step"]) for r in rows}
    text += "".join("\n" + markdown_table(per_subject[s], title=f"Subject {s} (G = step {steps[s][0]}, "
                                                              f"E = step {steps[s][1]})") for s in subjects)
    storage.write_text(storage.join(output, "results.md"), text)
    for subject_id in subjects:
        grid = image_grid(rows, subject_id, max_prompts=config.grid_prompts)
        storage.write_bytes(storage.join(output, "grids", f"{subject_id}.png"), encode_png(grid))
    report = {"summary": summary, "per_subject": per_subject, "config": config.to_json(),
              "subjects": subjects, "outputs": {
                  "scores": storage.join(output, "scores.parquet"),
                  "table": storage.join(output, "results.md"),
                  "grids": [storage.join(output, "grids", f"{s}.png") for s in subjects]}}
    storage.write_text(storage.join(output, "summary.json"), json.dumps(report, indent=2, allow_nan=True))
    return report


# --------------------------------------------------------------------------- the run

def run_evaluation(subjects_uri: str, checkpoints_root: str, output: str, clip_model: str,
                   dino_model: str, base: str = "embedded", config: EvalConfig = EvalConfig(),
                   use_ray: bool = True, actors: int = 1, gpus_per_actor: float = 0.0,
                   device: str | None = None, dtype: str | None = None) -> dict:
    """Evaluate every subject of the list; writes the outputs and returns the report dict.

    The model paths are checked before any work starts (a missing one is a ValueError naming
    --clip-model / --dino-model). ``use_ray=False`` runs the tasks inline in this process.
    """
    from dreamblend_ray.evaluation.metrics import resolve_model_path

    resolve_model_path(clip_model, "--clip-model")
    resolve_model_path(dino_model, "--dino-model")
    check_range("actors", actors, 1, 1024, integer=True)
    subjects = benchmark.read_subjects(subjects_uri)
    tasks = build_tasks(subjects, checkpoints_root, config)
    logger.info("evaluating %d subjects, %d prompts, %d seeds, %d methods", len(subjects), len(tasks),
                len(config.seeds), len(config.methods()))
    kwargs = dict(base=base, checkpoints_root=checkpoints_root, output=output, clip_model=clip_model,
                  dino_model=dino_model, config=config, device=device, dtype=dtype)
    if use_ray:
        lifecycle.init_ray()  # a no-op when the caller already connected (``dreamblend evaluate --address``)
        rows = _run_ray(tasks, kwargs, actors, gpus_per_actor)
    else:
        evaluator = Evaluator(**kwargs)
        rows = [row for task in _progress(tasks) for row in evaluator.evaluate_task(task)]
    rows.sort(key=lambda r: (r["subject_id"], r["prompt_index"], METHOD_ORDER.index(r["method"]),
                             r["alpha"], r["seed"]))
    return write_outputs(rows, output, config)


def _progress(tasks):
    from tqdm.auto import tqdm

    return tqdm(tasks, desc="evaluating")


def _run_ray(tasks: list[dict], kwargs: dict, actors: int, gpus_per_actor: float) -> list[dict]:
    import ray

    dataset = ray.data.from_items(tasks)
    scored = dataset.map_batches(Evaluator, fn_constructor_kwargs=kwargs, batch_size=1,
                                 batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
                                 num_gpus=gpus_per_actor or None)
    rows = []
    for row in scored.iter_rows():
        rows.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})
    return rows

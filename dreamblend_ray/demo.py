"""The end-to-end demo (the README's main job) on the embedded shapes-world model.

1. write the demo subjects' instance images and a subjects manifest;
2. fine-tune them in parallel with the Ray Data job (jobs/finetune_subjects.py's library function)
   into local storage; finished subjects are reused on a second run;
3. start the Ray Serve app and request, over HTTP, images for prompts the subjects were never
   shown with: G alone, E alone, and DreamBlend (E guided by G);
4. write ``grid.png`` (rows: subject and prompt; columns: instance image, G, E, DreamBlend) and
   ``report.md`` with the analytic metrics of each column; per subject, the cross-attention heat
   maps of one DreamBlend request (``attention-{id}.png``, asked for over HTTP with
   ``attention_maps``) and the attention probe's collapse plot (``collapse-{id}.png``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dreamblend_ray import demo_record
from dreamblend_ray.config import FinetuneConfig, SamplingConfig, check_choice, check_range
from dreamblend_ray.embedded import metrics
from dreamblend_ray.embedded.subjects import CONTEXTS, SUBJECTS, get_subject
from dreamblend_ray.runtime import lifecycle

logger = logging.getLogger(__name__)

COLUMNS = ("G alone", "E alone", "DreamBlend")
CONTEXT_TEXT = {"companion": "beside a second, named object it was never shown with",
                "background": "on backgrounds it was never shown on"}
CONTEXT_NOTE = {
    "companion": "The second object is spatial context: the model routes an object's word through "
                 "its cross-attention maps, which is what DreamBlend steers (docs/embedded.md).",
    "background": "On this model the background colour is not routed through cross-attention maps "
                  "(the attention over the prompt's tokens is nearly uniform in the background; see "
                  "docs/embedded.md), so attention guidance has little to steer there: expect "
                  "DreamBlend to recover little of the background.",
}


# The demo recipes' learning rates (rank 16, batch 4, 800 steps), measured in docs/embedded.md.
RECIPE_LR = {"lora": 2e-3, "full": 3e-4}


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo. Fine-tuning defaults are tuned for the embedded model on 2 CPU cores.

    The fine-tune is LoRA DreamBooth (the product's default; rank 16 on every attention
    projection, the embedded UNet's grown 16x16 level included, lr 2e-3, batch 4, 400 steps, no
    prior preservation), so the demo's requests run through the continuous batch's LoRA rows.
    ``method="full"`` keeps the earlier full-UNet recipe (lr 3e-4; run it with
    ``finetune_steps=800``). Either takes a subject from "draws the second object the prompt
    names" (G = step 50) towards "draws the subject and drops the rest of the prompt" (E = the
    last step). By step 400 the LoRA has most of its likeness (the star's is higher than at step
    800) while E still draws the second object in 0.60-0.73 of images, which leaves DreamBlend less
    to recover; DreamBlend guides the first 60% of the steps (K = 18) at alpha 0.25 with a
    constant step size (``eta_schedule``), the best setting for the star in
    benchmarks/toy_tradeoff.py and on par with the best for the ring (docs/embedded.md).
    ``learning_rate`` None is the method's recipe (``RECIPE_LR``).
    ``context`` says what the new prompts add: a second, named object (``companion``, spatial
    context, the kind DreamBlend's attention guidance carries) or a new background colour.
    """

    out: str = "outputs/demo"
    base: str = "embedded"
    subjects: tuple[str, ...] = ()  # empty: every demo subject
    method: str = "lora"
    finetune_steps: int = 400
    checkpoint_steps: tuple[int, ...] = (50, 100, 200, 400, 800)
    guidance_step: int | None = 50
    learning_rate: float | None = None  # None: RECIPE_LR[method]
    rank: int = 16
    batch_size: int = 4
    context: str = "companion"
    contexts_per_subject: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 30
    guidance_scale: float = 3.0
    alpha: float = 0.25  # with LoRA E, 0.5 smears colour (docs/embedded.md, the grown base)
    guidance_fraction: float = 0.6  # guide the first 60% of the steps (K = 18 of 30)
    eta_schedule: str = "constant"
    actors: int = 2
    port: int = 0
    attention_maps: bool = True  # one heat-map grid per subject, from one DreamBlend request
    attention_probe: bool = True  # the fine-tune job's collapse probe (subject.json, collapse.png)
    extra_finetune: dict = field(default_factory=dict)

    def __post_init__(self):
        check_range("finetune_steps", self.finetune_steps, 1, 100_000, integer=True)
        check_range("contexts_per_subject", self.contexts_per_subject, 1, 8, integer=True)
        check_choice("method", self.method, tuple(RECIPE_LR))
        if self.learning_rate is not None:
            check_range("learning_rate", self.learning_rate, 0.0, 1.0)

        check_choice("context", self.context, CONTEXTS)
        check_range("steps", self.steps, 1, 1000, integer=True)
        check_range("alpha", self.alpha, 0.0, 10.0)
        check_range("guidance_fraction", self.guidance_fraction, 0.0, 1.0)
        SamplingConfig(eta_schedule=self.eta_schedule)  # a registered schedule, or its ValueError
        check_range("actors", self.actors, 1, 64, integer=True)
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")

    @property
    def lr(self) -> float:
        """The fine-tune's learning rate: the one given, else the method's recipe."""
        return RECIPE_LR[self.method] if self.learning_rate is None else self.learning_rate

    @property
    def storage_root(self) -> str:
        return str(Path(self.out) / "storage")


# --------------------------------------------------------------------------- 1. subjects

def demo_subjects(config: DemoConfig):

    return [get_subject(s) for s in config.subjects] if config.subjects else list(SUBJECTS)


def write_subjects_manifest(config: DemoConfig, subjects) -> str:
    """Instance images as PNGs and a JSONL subjects manifest; returns the manifest's path."""
    root = Path(config.out) / "instance_images"
    lines = []
    for subject in subjects:
        paths = subject.save_instance_images(root / subject.subject_id)
        lines.append(json.dumps({"subject_id": subject.subject_id, "class_noun": subject.class_noun,
                                 "images": [str(p.resolve()) for p in paths]}))
    manifest = Path(config.out) / "subjects.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return str(manifest)


# --------------------------------------------------------------------------- 2. fine-tuning

def finetune_config(config: DemoConfig, subjects):

    # No prior preservation: the demo wants the late checkpoint to overfit, as DreamBooth does.
    steps = tuple(s for s in config.checkpoint_steps if s <= config.finetune_steps)
    guidance = config.guidance_step if config.guidance_step in steps else None
    values = dict(method=config.method, steps=config.finetune_steps, checkpoint_steps=steps,
                  guidance_step=guidance, learning_rate=config.lr, rank=config.rank,
                  batch_size=config.batch_size, token=subjects[0].token, prior_preservation=False,
                  num_class_images=0)
    values.update(config.extra_finetune)
    return FinetuneConfig(**values)


def drop_stale_subjects(config: DemoConfig, subjects, wanted) -> list[str]:
    """Forget finished subjects fine-tuned with other settings, so the job trains them again."""
    from dreamblend_ray.training import layout
    from dreamblend_ray.io import storage

    stale = []
    for subject in subjects:
        root, subject_id = config.storage_root, subject.subject_id
        if layout.is_complete(root, subject_id) and not layout.finetuned_with(root, subject_id, wanted):
            logger.info("%s was fine-tuned with other settings; fine-tuning it again", subject_id)
            storage.delete(layout.manifest_uri(root, subject_id))
            stale.append(subject_id)
    return stale


def finetune(config: DemoConfig, subjects, manifest: str):
    # Deferred: the job and the scorer import torch and Ray. The scorer registers the embedded
    # model's probe prompts (the subject beside a second object), which the job hands its actors.
    import dreamblend_ray.embedded.scorer  # noqa: F401
    from dreamblend_ray.jobs.finetune import run_finetune_job
    from dreamblend_ray.jobs.common import JobResources

    wanted = finetune_config(config, subjects)
    drop_stale_subjects(config, subjects, wanted)
    resources = JobResources(num_actors=min(config.actors, len(subjects)), cpus_per_actor=1.0)
    result = run_finetune_job(manifest, config.storage_root, base=config.base, config=wanted,
                              resources=resources, attention_probe=config.attention_probe)
    failed = [row for row in result.rows if row["status"] == "failed"]
    if failed:
        raise RuntimeError(f"fine-tuning failed for {[(r['subject_id'], r['error']) for r in failed]}")
    return result


# --------------------------------------------------------------------------- 3. serving

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Cell:
    """One request of the grid: a subject, a prompt and a column."""

    subject_id: str
    prompt: str
    column: str


def requests_for(config: DemoConfig, subjects) -> list[Cell]:
    cells = []
    for subject in subjects:
        for prompt in subject.context_prompts(config.context, config.contexts_per_subject):
            cells += [Cell(subject.subject_id, prompt, column) for column in COLUMNS]
    return cells


def request_body(config: DemoConfig, cell: Cell, manifests: dict) -> dict:
    body = {"subject_id": cell.subject_id, "prompt": cell.prompt, "num_images": len(config.seeds),
            "seed": config.seeds[0], "num_inference_steps": config.steps,
            "guidance_scale": config.guidance_scale, "response_format": "json"}
    if cell.column == "G alone":
        g = manifests[cell.subject_id]["guidance_step"]
        body.update(alpha=0.0, guidance_step=g, edit_step=g)
    elif cell.column == "E alone":
        body.update(alpha=0.0)
    else:
        body.update(alpha=config.alpha, guidance_steps=round(config.guidance_fraction * config.steps),
                    eta_schedule=config.eta_schedule)
    return body


def decode_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def fetch_images(url: str, config: DemoConfig, cells: list[Cell], manifests: dict) -> dict:
    """POST every cell, one at a time in ``cells``' order; returns cell -> list of images.

    One at a time: the continuous batch still runs each request's images as LoRA rows together,
    but never beside another request's. Batched with others, a row's floating point differs in
    the last bits (a matrix product's blocking depends on the row count), and DreamBlend's latent
    updates amplify that until one or two of the 27 images change: the figures would then depend
    on the order in which requests arrived (issue 32)."""
    import httpx
    from tqdm import tqdm

    results = {}
    with httpx.Client(timeout=600) as client:
        for cell in tqdm(cells, desc="demo requests"):
            response = client.post(f"{url}/v1/generate", json=request_body(config, cell, manifests))
            if response.status_code != 200:
                raise RuntimeError(f"{cell}: HTTP {response.status_code}: {response.text[:300]}")
            results[cell] = [decode_png(b) for b in response.json()["images"]]
    return results


def attention_cells(config: DemoConfig, cells: list[Cell]) -> list[Cell]:
    """One DreamBlend cell per subject (its first prompt) for the heat maps; none when they are off."""
    if not config.attention_maps:
        return []
    firsts = {}
    for cell in cells:
        if cell.column == "DreamBlend":
            firsts.setdefault(cell.subject_id, cell)
    return list(firsts.values())


def attention_body(config: DemoConfig, cell: Cell, manifests: dict) -> dict:
    """The DreamBlend request of ``cell`` for one image (the first seed), with its heat maps."""
    return {**request_body(config, cell, manifests), "num_images": 1, "attention_maps": True}


def fetch_attention(url: str, config: DemoConfig, cells: list[Cell], manifests: dict) -> dict:
    """POST each cell with ``attention_maps``; returns subject id -> ``AttentionReport`` (G's and
    unguided E's images from the answer's ``attention`` entry, DreamBlend's its ``images[0]``)."""
    import httpx
    # Deferred: heatmap_report imports torch, which `dreamblend demo --help` must not load.
    from dreamblend_ray.method.heatmap_report import AttentionReport

    def post(cell: Cell):
        response = client.post(f"{url}/v1/generate", json=attention_body(config, cell, manifests))
        if response.status_code != 200:
            raise RuntimeError(f"{cell} with attention_maps: HTTP {response.status_code}: {response.text[:300]}")
        data = response.json()
        entry = data["attention"][0]
        images = {"dreamblend": decode_png(data["images"][0]),
                  **{row: decode_png(png) for row, png in entry["images"].items()}}
        return cell.subject_id, AttentionReport.from_json(entry, images, cell.prompt, data["seeds"][0])

    with httpx.Client(timeout=600) as client:  # one at a time, as fetch_images
        return dict(map(post, cells))


def serve_and_fetch(config: DemoConfig, cells: list[Cell], manifests: dict) -> tuple[dict, dict]:
    """Serve the subjects; returns (cell -> images, subject id -> heat-map report)."""
    from ray import serve

    from dreamblend_ray.serving.app import build_app
    from dreamblend_ray.serving.requests import AppArgs

    port = config.port or free_port()
    args = AppArgs(base=config.base, storage_root=os.path.abspath(config.storage_root), max_models_per_replica=8,
                   max_images_per_request=max(4, len(config.seeds)), max_batch_size=8,
                   max_ongoing_requests=16, request_timeout_s=600, default_steps=config.steps)

    lifecycle.start_serve("127.0.0.1", port)
    try:
        serve.run(build_app(args), name="dreamblend-demo", route_prefix="/")
        logger.info("serving on http://127.0.0.1:%d; requesting %d cells", port, len(cells))
        url = f"http://127.0.0.1:{port}"
        images = fetch_images(url, config, cells, manifests)
        return images, fetch_attention(url, config, attention_cells(config, cells), manifests)
    finally:
        lifecycle.stop_serve()


# --------------------------------------------------------------------------- 4. grid and report

def upscale(image: Image.Image, factor: int = 4) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def draw_grid(rows: list[tuple[str, list[Image.Image]]], headers: list[str], cell: int = 128,
              label_width: int | None = None) -> Image.Image:
    """A labelled grid: one row per (label, images), one column per header; the label column is
    as wide as the longest label unless ``label_width`` is given."""
    pad, header_height = 4, 20
    if label_width is None:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = 8 + max([int(measure.textlength(label)) for label, _ in rows] or [0])
    width = label_width + len(headers) * (cell + pad)
    grid = Image.new("RGB", (width, header_height + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, header in enumerate(headers):
        draw.text((label_width + j * (cell + pad) + 4, 4), header, fill="black")
    for i, (label, images) in enumerate(rows):
        top = header_height + i * (cell + pad)
        draw.text((4, top + cell // 2 - 6), label, fill="black")
        for j, image in enumerate(images):
            grid.paste(upscale(image, cell // image.width), (label_width + j * (cell + pad), top))
    return grid


def column_metrics(config: DemoConfig, subjects, cells: list[Cell], images: dict) -> dict:
    """Per column: prompt fidelity, subject fidelity and diversity (analytic, embedded metrics),
    with each image's scores and each seed's figures (``demo_record.column_record``)."""
    by_id = {s.subject_id: s for s in subjects}
    table = {}
    for column in COLUMNS:
        chosen = [c for c in cells if c.column == column]
        flat = [(c, img) for c in chosen for img in images[c]]
        prompt = metrics.prompt_fidelity([img for _, img in flat], [c.prompt for c, _ in flat])
        per_cell = [metrics.subject_scores_per_image(images[c], by_id[c.subject_id].instance_images())
                    for c in chosen]
        subject = [s["score"] for scores in per_cell for s in scores]
        spread = [metrics.diversity(images[c])["score"] for c in chosen]
        figures = {"prompt_fidelity": metrics.context_fidelity(prompt), "background": prompt["background"],
                   "all_correct": prompt["all_correct"], "subject_fidelity": float(np.mean(subject)),
                   "diversity": float(np.mean(spread)), "images": len(flat)}
        per_image_prompt = [metrics.context_score(img, c.prompt) for c, img in flat]
        table[column] = demo_record.column_record(figures, per_image_prompt, subject, config.seeds)
    return table


RECORDED_SETTINGS = ("base", "subjects", "method", "finetune_steps", "checkpoint_steps", "guidance_step", "lr",
                     "rank", "batch_size", "context", "contexts_per_subject", "seeds", "steps",
                     "guidance_scale", "alpha", "guidance_fraction", "eta_schedule", "extra_finetune")


def demo_settings(config: DemoConfig) -> dict:
    """The settings the demo's figures depend on (not where it writes, its port or its extras)."""
    return json.loads(json.dumps({name: getattr(config, name) for name in RECORDED_SETTINGS}))


def report_markdown(config: DemoConfig, table: dict, finetune_result, manifests: dict,
                    seconds: dict) -> str:
    lines = ["# DreamBlend demo (embedded shapes-world model)", "",
             f"Subjects fine-tuned ({config.method}, lr {config.lr:g}, batch {config.batch_size}) "
             f"for {config.finetune_steps} steps; G and E are the pair "
             f"recorded in each subject.json. Prompts put the subject {CONTEXT_TEXT[config.context]}; "
             f"{len(config.seeds)} seeds each, {config.steps} DDIM steps, CFG {config.guidance_scale}, "
             f"DreamBlend alpha {config.alpha}, guided steps K = "
             f"{round(config.guidance_fraction * config.steps)}, {config.eta_schedule} step size. Prompt fidelity is the share of that new context drawn "
             "right (the second object's shape and colour, or the background colour).", "",
             f"One image moves a column's prompt fidelity by {1 / table[COLUMNS[0]]['images']:.3f}; in brackets, the "
             "range of the figure over the seeds, each seed's images alone.", "",
             "| column | prompt fidelity | background correct | all attributes correct | subject fidelity | diversity |",
             "|---|---|---|---|---|---|"]
    for column, row in table.items():
        (p_lo, p_hi), (s_lo, s_hi) = (row["seeds"]["range"][f] for f in ("prompt_fidelity", "subject_fidelity"))
        lines.append(f"| {column} | {row['prompt_fidelity']:.2f} ({p_lo:.2f}-{p_hi:.2f}) | {row['background']:.2f} | "
                     f"{row['all_correct']:.2f} | {row['subject_fidelity']:.3f} ({s_lo:.3f}-{s_hi:.3f}) | "
                     f"{row['diversity']:.3f} |")
    g, e, blend = (table[c] for c in COLUMNS)
    lost = g["prompt_fidelity"] - e["prompt_fidelity"]
    lines += ["", f"Trade-off: E loses {lost:+.2f} of prompt fidelity against G and gains "
              f"{e['subject_fidelity'] - g['subject_fidelity']:+.3f} of subject fidelity. "
              + ("That is the trade-off DreamBlend addresses." if lost >= 0.1 else
                 "That is too small for the targets below to say much: at these settings the late "
                 "checkpoint has not overfit (see benchmarks/toy_tradeoff.py)."), "",
              CONTEXT_NOTE[config.context], "",
              "Targets (issue #8): DreamBlend keeps prompt fidelity within 10% of G's and subject "
              "fidelity within 10% of E's.", "",
              f"- prompt fidelity: DreamBlend {blend['prompt_fidelity']:.2f} vs G {g['prompt_fidelity']:.2f} "
              f"-> {'met' if blend['prompt_fidelity'] >= 0.9 * g['prompt_fidelity'] else 'NOT met'}",
              f"- subject fidelity: DreamBlend {blend['subject_fidelity']:.3f} vs E {e['subject_fidelity']:.3f} "
              f"-> {'met' if blend['subject_fidelity'] >= 0.9 * e['subject_fidelity'] else 'NOT met'}", "",
              "| subject | status | G step | E step |", "|---|---|---|---|"]
    for row in finetune_result.rows:
        m = manifests[row["subject_id"]]
        lines.append(f"| {row['subject_id']} | {row['status']} | {m['guidance_step']} | {m['edit_step']} |")
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), ""]
    return "\n".join(lines)


def write_attention_grids(out: Path, reports: dict) -> dict:
    """Per subject ``attention-{id}.png`` (rows G / E / DreamBlend, columns the image then the
    words) and ``attention-{id}.json`` (the maps); returns subject id -> the PNG's name."""
    names = {}
    for subject_id, report in reports.items():
        names[subject_id] = f"attention-{subject_id}.png"
        report.grid().save(out / names[subject_id])
        (out / f"attention-{subject_id}.json").write_text(json.dumps(report.to_json()) + "\n")
    return names


def copy_collapse_plots(config: DemoConfig, out: Path, manifests: dict) -> dict:
    """Each probed subject's ``collapse.png`` copied beside the report as ``collapse-{id}.png``;
    returns subject id -> that name (subjects without a probe record or plot are left out)."""
    from dreamblend_ray.io import storage
    from dreamblend_ray.training import layout

    names = {}
    for subject_id, manifest in manifests.items():
        uri = layout.collapse_plot_uri(config.storage_root, subject_id)
        if config.attention_probe and manifest.get("attention_probe") and storage.exists(uri):
            names[subject_id] = f"collapse-{subject_id}.png"
            (out / names[subject_id]).write_bytes(storage.read_bytes(uri))
    return names


def probe_line(probe: dict) -> str:
    """The probe's figures in one sentence: collapse at the first and the last checkpoint, and the base's."""
    rows = sorted(probe["rows"], key=lambda r: r["step"])
    first, last = rows[0], rows[-1]
    line = (f"Attention probe: collapse (the share of the other words' attention inside the subject's "
            f"region) {first['collapse']:.3f} at step {first['step']} and {last['collapse']:.3f} at step "
            f"{last['step']}; base model {probe['base']['collapse']:.3f}")
    if "subject_share" in last:
        line += f"; the subject's own share at step {last['step']}: {last['subject_share']:.3f}"
    return line + "."


def attention_markdown(reports: dict, grids: dict, plots: dict, manifests: dict) -> str:
    """The report's heat-map section: each subject's grid, its mean E-to-G distance, its collapse plot."""
    if not grids and not plots:
        return ""
    lines = ["", "## Where the words look", "",
             "One DreamBlend request per subject with `attention_maps` (the first seed): rows G / E "
             "(unguided) / DreamBlend, columns the image then one heat map per word, averaged over the "
             "guided layers and every step, one colour scale per column (docs/attention.md).", ""]
    for subject_id in sorted(set(grids) | set(plots)):
        lines += [f"### {subject_id}", ""]
        if subject_id in grids:
            report = reports[subject_id]
            lines += [f"\"{report.prompt}\", seed {report.seed}:", "",
                      f"![heat maps of {subject_id}]({grids[subject_id]})", ""]
            finite = [d for d in report.distance if np.isfinite(d)]
            if finite:
                lines += [f"Mean E-to-G attention distance over the {len(finite)} guided steps: "
                          f"{np.mean(finite):.3f}.", ""]
        if subject_id in plots:
            lines += [probe_line(manifests[subject_id]["attention_probe"]), "",
                      f"![collapse of {subject_id}]({plots[subject_id]})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the whole demo

def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    from dreamblend_ray.training import layout

    out, seconds, start = Path(config.out), {}, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    subjects = demo_subjects(config)
    manifest = write_subjects_manifest(config, subjects)
    started = lifecycle.init_ray(num_cpus=os.cpu_count() or 2)
    try:
        logger.info("step 1/3: fine-tuning %d subjects", len(subjects))
        result = finetune(config, subjects, manifest)
        seconds["fine-tuning"] = time.perf_counter() - start
        manifests = {s.subject_id: layout.read_manifest(config.storage_root, s.subject_id) for s in subjects}
        cells = requests_for(config, subjects)
        logger.info("step 2/3: serving and requesting %d image sets over HTTP", len(cells))
        images, reports = serve_and_fetch(config, cells, manifests)
        seconds["serving"] = time.perf_counter() - start - seconds["fine-tuning"]
    finally:
        if started:
            lifecycle.shutdown()
    logger.info("step 3/3: grid and report")
    by_id = {s.subject_id: s for s in subjects}
    rows = []
    for cell in cells:
        if cell.column == COLUMNS[0]:
            instance = by_id[cell.subject_id].instance_images()[0]
            rows.append((f"{cell.subject_id}: {cell.prompt}",
                         [instance] + [images[Cell(cell.subject_id, cell.prompt, c)][0] for c in COLUMNS]))
    draw_grid(rows, ["instance image", *COLUMNS]).save(out / "grid.png")
    table = column_metrics(config, subjects, cells, images)
    record = {"settings": demo_settings(config), "columns": table}
    seconds["total"] = time.perf_counter() - start
    heat_maps = attention_markdown(reports, write_attention_grids(out, reports),
                                   copy_collapse_plots(config, out, manifests), manifests)
    (out / "report.md").write_text(report_markdown(config, table, result, manifests, seconds) + heat_maps
                                   + demo_record.comparison_markdown(record, demo_record.read_recorded()))
    (out / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "timings.json").write_text(json.dumps(seconds, indent=2) + "\n")
    logger.info("wrote %s and %s in %.0f s", out / "grid.png", out / "report.md", seconds["total"])
    return table

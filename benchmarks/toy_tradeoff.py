"""The fidelity trade-off on the embedded shapes world, and what DreamBlend does to it.

Fine-tunes a demo subject (the demo's recipe: LoRA rank 16 on every attention projection, lr 2e-3,
by default; ``--method full`` the full-UNet one, lr 3e-4; reused when done with the same settings), then measures with the exact analytic metrics of
dreamblend_ray.embedded.metrics, on prompts that put the subject in a context its instance images
never showed (``--context companion``: beside a second, named object, "a sks shape and a red
circle on a blue background"; ``--context background``: on a new background colour):

* every saved checkpoint sampled alone: subject fidelity, prompt fidelity (the share of the new
  context drawn right: the second object's shape and colour, or the background), diversity;
* DreamBlend (G = the manifest's guidance step, E = the last step) for alpha in
  {0, 0.1, 0.25, 0.5, 1}, two guidance windows and two step-size schedules (eta decaying
  linearly over the window, the sampler's default, and constant);
* a confirmation pass (``--confirm-seeds``, default 16): G, E and the best DreamBlend row measured
  again on fresh seeds, since the best of ten noisy rows flatters itself; the target is judged on
  those figures.

Each row also splits subject fidelity by whether the image drew the new context ("subj|ok",
"subj|no"): when a model's own images that keep the context score far lower on likeness than
those that drop it, the two fidelities conflict image by image: a sampler that keeps the
context and E's likeness must draw the subject better than E itself does beside a second object.

Writes a PNG plot (prompt fidelity against subject fidelity) and prints a table; the last line is
``RESULT {json}``. Target (issue #8): DreamBlend keeps prompt fidelity within 10% of G's and subject
fidelity within 10% of E's. ``subject_ratio_bound`` says whether that is within reach of steering
E at all: the subject ratio of a sampler that draws the context at 0.9 of G's rate and the subject
as E's own images do, split by context (:func:`steering_bound`).

    python benchmarks/toy_tradeoff.py [--subject striped-star] [--context companion] [--out outputs/tradeoff]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dreamblend_ray.training import checkpoints, layout
from dreamblend_ray.models.components import load_components
from dreamblend_ray.config import FinetuneConfig, SamplingConfig
from dreamblend_ray.embedded import metrics
from dreamblend_ray.demo import RECIPE_LR
from dreamblend_ray.embedded.subjects import CONTEXTS, get_subject
from dreamblend_ray.training.finetune import finetune_subject
from dreamblend_ray.method.sampler import DreamBlendSampler

logger = logging.getLogger("toy_tradeoff")
ALPHAS = (0.0, 0.1, 0.25, 0.5, 1.0)
CONFIRM_SEED0 = 1000  # the confirmation seeds start here, far from the sweep's 0..seeds-1


def ensure_subject(components, subject, root: str, config: FinetuneConfig) -> dict:
    if layout.finetuned_with(root, subject.subject_id, config):
        return layout.read_manifest(root, subject.subject_id)
    if layout.is_complete(root, subject.subject_id):
        logger.info("%s was fine-tuned with other settings; fine-tuning it again", subject.subject_id)
    return finetune_subject(components, subject.instance_images(), subject.class_noun, subject.subject_id,
                            root, config, progress=True)


def measure(sampler, pair, subject, prompts, seeds, config: SamplingConfig) -> dict:
    """Analytic scores of one (pair, settings) over prompts x seeds."""
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    result = sampler.sample(pair, all_prompts, all_seeds, config, track_distance=True)
    images = result.images
    per_prompt = [images[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]
    fidelity = metrics.prompt_fidelity(images, all_prompts)
    split = metrics.subject_fidelity_by_context(images, all_prompts, subject.instance_images())
    return {
        "prompt_fidelity": metrics.context_fidelity(fidelity),
        "background": fidelity["background"],
        "shape": fidelity["shape"],
        "subject_fidelity": split["score"],
        "context_right": split["context_right"],
        "subject_when_context_right": split["when_right"],
        "subject_when_context_wrong": split["when_wrong"],
        "diversity": float(np.mean([metrics.diversity(group)["score"] for group in per_prompt])),
        "attention_distance": float(result.attention_distance.mean()) if result.attention_distance.numel() else 0.0,
        "images": images,
    }


def plot(rows: list[dict], path: Path, best: dict | None = None, confirmed: dict | None = None,
         size: int = 480) -> None:
    """Prompt fidelity (y) against subject fidelity (x): the checkpoints as a grey line, each
    DreamBlend row as a red dot (``best`` labelled), and the confirmation pass's G, E and DreamBlend
    as hollow squares. The x axis ends just past the largest subject fidelity."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    margin, span = 50, size - 100
    x_top = max(0.6, max(r["subject_fidelity"] for r in rows) + 0.05)

    def xy(subject: float, prompt: float) -> tuple[float, float]:
        return margin + subject / x_top * span, size - margin - prompt * span

    def dot(point, colour, label=None, square=False):
        x, y = point
        (draw.rectangle if square else draw.ellipse)([x - 4, y - 4, x + 4, y + 4], outline=colour,
                                                     fill=None if square else colour)
        if label:
            draw.text((x + 6, y - 12), label, fill=colour)

    draw.rectangle([margin, margin, size - margin, size - margin], outline="black")
    draw.text((size // 2 - 40, size - margin + 20), "subject fidelity", fill="black")
    draw.text((4, margin - 20), "prompt fidelity", fill="black")
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((margin - 30, xy(0, v)[1] - 6), f"{v:.2f}", fill="black")
        if v <= x_top:
            draw.text((xy(v, 0)[0] - 10, size - margin + 4), f"{v:.2f}", fill="black")
    ckpts = [r for r in rows if r["kind"] == "checkpoint"]
    draw.line([xy(r["subject_fidelity"], r["prompt_fidelity"]) for r in ckpts], fill="gray", width=2)
    for r in ckpts:
        dot(xy(r["subject_fidelity"], r["prompt_fidelity"]), "gray", f"step {r['step']}")
    for r in rows:
        if r["kind"] == "dreamblend" and r["alpha"] > 0:
            label = f"best: a={r['alpha']} K={r['window']} {r['schedule']}" if r is best else None
            dot(xy(r["subject_fidelity"], r["prompt_fidelity"]), "red", label)
    if confirmed:
        for name, colour in (("g", "gray"), ("e", "gray"), ("dreamblend", "blue")):
            point = xy(confirmed[f"{name}_subject_fidelity"], confirmed[f"{name}_prompt_fidelity"])
            dot(point, colour, f"{'G' if name == 'g' else 'E' if name == 'e' else 'best'}, fresh seeds", square=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description="fidelity trade-off on the embedded model")
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--subject", default="striped-star")
    parser.add_argument("--out", default="outputs/tradeoff")
    parser.add_argument("--method", default="lora", choices=("full", "lora"))
    parser.add_argument("--finetune-steps", type=int, default=400,
                        help="fine-tune length (default 400, the demo's: the LoRA's likeness falls "
                             "again by step 800, docs/embedded.md)")
    parser.add_argument("--lr", type=float, default=None,
                        help="fine-tune learning rate (default: the demo's for --method, RECIPE_LR)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (--method lora)")
    parser.add_argument("--checkpoints", default="50,100,200,400,800",
                        help="saved steps (those past --finetune-steps are dropped)")
    parser.add_argument("--context", default="companion", choices=CONTEXTS,
                        help="what the new prompts ask for: a second, named object beside the subject "
                             "(spatial context), or a new background colour (global context)")
    parser.add_argument("--backgrounds", "--contexts", dest="contexts", type=int, default=3,
                        help="how many new contexts (companions or backgrounds)")
    parser.add_argument("--seeds", type=int, default=8,
                        help="seeds per context (default 8: the README and docs figures use it)")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--windows", default="0.3,0.6", help="guidance windows as fractions of the steps")
    parser.add_argument("--eta-schedules", default="linear,constant",
                        help="step-size schedules over the guided steps (method/guidance.py's ETA_SCHEDULES)")
    parser.add_argument("--step-size", type=float, default=None)
    parser.add_argument("--alphas", default=",".join(str(a) for a in ALPHAS), help="DreamBlend strengths")
    parser.add_argument("--guidance-step", type=int, default=None, help="G (default: the manifest's)")
    parser.add_argument("--edit-step", type=int, default=None, help="E (default: the manifest's)")
    parser.add_argument("--token-indices", default="",
                        help="compare only these 1-based prompt positions (default: every token)")
    parser.add_argument("--finetune-json", default="{}", help="further FinetuneConfig fields (JSON)")
    parser.add_argument("--confirm-seeds", type=int, default=16,
                        help="re-measure G, E and the best DreamBlend row on this many fresh seeds "
                             "(the best of many noisy rows is biased upwards); 0 skips it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    components = load_components(args.base)
    subject = get_subject(args.subject)
    saved = tuple(int(step) for step in args.checkpoints.split(",") if int(step) <= args.finetune_steps)
    lr = RECIPE_LR[args.method] if args.lr is None else args.lr
    values = dict(method=args.method, steps=args.finetune_steps, learning_rate=lr, rank=args.rank,
                  batch_size=4, checkpoint_steps=saved, guidance_step=saved[0] if saved else None,
                  token=subject.token, prior_preservation=False, num_class_images=0)
    ft = FinetuneConfig(**{**values, **json.loads(args.finetune_json)})
    manifest = ensure_subject(components, subject, str(out / "storage"), ft)
    prompts = subject.context_prompts(args.context, args.contexts)
    seeds = list(range(args.seeds))
    sampler = DreamBlendSampler(components)
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    if args.step_size is not None:
        common["step_size"] = args.step_size
    if args.token_indices:
        common["token_indices"] = tuple(int(i) for i in args.token_indices.split(","))
    rows = []
    for step in manifest["steps"]:
        pair, _ = checkpoints.load_pair(str(out / "storage"), subject.subject_id, components, step, step)
        scores = measure(sampler, pair, subject, prompts, seeds, SamplingConfig(alpha=0.0, **common))
        rows.append({"kind": "checkpoint", "step": step, "alpha": 0.0, "window": 0, **scores})
        checkpoints.unload_pair(pair, components)
    g = args.guidance_step or manifest["guidance_step"]
    e = args.edit_step or manifest["edit_step"]
    pair, _ = checkpoints.load_pair(str(out / "storage"), subject.subject_id, components, g, e)
    schedules = args.eta_schedules.split(",")
    for schedule in schedules:
        for fraction in (float(w) for w in args.windows.split(",")):
            for alpha in (float(a) for a in args.alphas.split(",")):
                if alpha == 0 and schedule != schedules[0]:
                    continue  # alpha 0 is E alone whatever the schedule
                config = SamplingConfig(alpha=alpha, guidance_fraction=fraction, eta_schedule=schedule, **common)
                scores = measure(sampler, pair, subject, prompts, seeds, config)
                rows.append({"kind": "dreamblend", "step": e, "alpha": alpha, "window": config.window,
                             "fraction": fraction, "schedule": schedule, **scores})
    checkpoints.unload_pair(pair, components)
    confirmed = None
    if args.confirm_seeds:
        fresh = list(range(CONFIRM_SEED0, CONFIRM_SEED0 + args.confirm_seeds))
        confirmed = confirm(sampler, components, str(out / "storage"), subject, prompts, fresh, g, e,
                            best_blend(rows, g, e), common)
    report(rows, g, e, out, subject.subject_id, confirmed)


def ratios(blend: dict, g_row: dict, e_row: dict) -> tuple[float, float]:
    """(DreamBlend's prompt fidelity / G's, its subject fidelity / E's): the target's two figures."""
    return (blend["prompt_fidelity"] / max(g_row["prompt_fidelity"], 1e-9),
            blend["subject_fidelity"] / max(e_row["subject_fidelity"], 1e-9))


def steering_bound(g: dict, e: dict, share: float = 0.9) -> float | None:
    """The subject ratio to E of a sampler that draws the new context in ``share`` of G's share
    of images and draws the subject in each group as E's own images do (``when_right`` where the
    context is drawn, ``when_wrong`` where not). Above 0.9 the target is within reach of steering
    E; below it a sampler must draw the subject beside the context better than E itself does.
    None when E's images fall in one group only."""
    right, wrong = e["subject_when_context_right"], e["subject_when_context_wrong"]
    if right is None or wrong is None or e["subject_fidelity"] <= 0:
        return None
    drawn = min(1.0, share * g["context_right"])
    return (drawn * right + (1.0 - drawn) * wrong) / e["subject_fidelity"]


def checkpoint_rows(rows: list[dict], g: int, e: int) -> tuple[dict, dict]:
    """The rows of G's and E's checkpoints sampled alone."""
    by_step = {r["step"]: r for r in rows if r["kind"] == "checkpoint"}
    return by_step[g], by_step[e]


def best_blend(rows: list[dict], g: int, e: int) -> dict:
    """The DreamBlend row (alpha > 0) whose worse ratio to the target is the best."""
    g_row, e_row = checkpoint_rows(rows, g, e)
    blends = [r for r in rows if r["kind"] == "dreamblend" and r["alpha"] > 0]
    return max(blends, key=lambda r: min(ratios(r, g_row, e_row)))


def confirm(sampler, components, root, subject, prompts, seeds, g, e, best, common) -> dict:
    """G, E and the chosen DreamBlend settings again, on seeds the choice never saw."""
    plain = SamplingConfig(alpha=0.0, **common)
    scores = {}
    for name, (gs, es, config) in {
        "g": (g, g, plain), "e": (e, e, plain),
        "dreamblend": (g, e, SamplingConfig(alpha=best["alpha"], guidance_fraction=best["fraction"],
                                            eta_schedule=best["schedule"], **common)),
    }.items():
        pair, _ = checkpoints.load_pair(root, subject.subject_id, components, gs, es)
        scores[name] = {k: v for k, v in measure(sampler, pair, subject, prompts, seeds, config).items()
                        if k != "images"}
        checkpoints.unload_pair(pair, components)
    prompt_ratio, subject_ratio = ratios(scores["dreamblend"], scores["g"], scores["e"])
    return {"seeds": [seeds[0], seeds[-1]], "alpha": best["alpha"], "window": best["window"],
            "schedule": best["schedule"],
            **{f"{name}_{key}": rounded(scores[name][key]) for name in scores
               for key in ("prompt_fidelity", "subject_fidelity", "context_right", "subject_when_context_right",
                           "subject_when_context_wrong")},
            "prompt_ratio_to_g": round(prompt_ratio, 3), "subject_ratio_to_e": round(subject_ratio, 3),
            "subject_ratio_bound": rounded(steering_bound(scores["g"], scores["e"]))}


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def save_grid(rows: list[dict], path: Path, cell: int = 34) -> None:
    """Every row's images side by side (row order as in the table), upscaled 2x."""
    width = max(len(r["images"]) for r in rows)
    grid = Image.new("RGB", (width * cell, len(rows) * cell), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row["images"]):
            grid.paste(image, (j * cell, i * cell))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def report(rows: list[dict], g: int, e: int, out: Path, subject_id: str, confirmed: dict | None) -> None:
    header = (f"{'row':37s} {'prompt':>7s} {'bg':>5s} {'shape':>5s} {'subject':>8s} {'ctx ok':>6s} "
              f"{'subj|ok':>7s} {'subj|no':>7s} {'divers.':>8s} {'attn d':>7s}")
    lines = [f"subject {subject_id}: G = step {g}, E = step {e}", header, "-" * len(header)]
    for r in rows:
        name = (f"checkpoint step {r['step']}" if r["kind"] == "checkpoint"
                else f"DreamBlend a={r['alpha']} K={r['window']} {r['schedule']}")
        shape = "-" if r["shape"] is None else f"{r['shape']:.2f}"
        right, wrong = (("-" if v is None else f"{v:.3f}")
                        for v in (r["subject_when_context_right"], r["subject_when_context_wrong"]))
        lines.append(f"{name:37s} {r['prompt_fidelity']:7.2f} {r['background']:5.2f} {shape:>5s} "
                     f"{r['subject_fidelity']:8.3f} {r['context_right']:6.2f} {right:>7s} {wrong:>7s} "
                     f"{r['diversity']:8.3f} {r['attention_distance']:7.4f}")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its table
    best = best_blend(rows, g, e)
    plot(rows, out / "tradeoff.png", best, confirmed)
    save_grid(rows, out / "images.png")
    g_row, e_row = checkpoint_rows(rows, g, e)
    prompt_ratio, subject_ratio = ratios(best, g_row, e_row)
    result = {
        "subject": subject_id, "guidance_step": g, "edit_step": e,
        "g_prompt_fidelity": round(g_row["prompt_fidelity"], 3), "g_subject_fidelity": round(g_row["subject_fidelity"], 3),
        "e_prompt_fidelity": round(e_row["prompt_fidelity"], 3), "e_subject_fidelity": round(e_row["subject_fidelity"], 3),
        "best_dreamblend": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in best.items() if k != "images"},
        "prompt_ratio_to_g": round(prompt_ratio, 3),
        "subject_ratio_to_e": round(subject_ratio, 3),
        "subject_ratio_bound": rounded(steering_bound(g_row, e_row)),
        "tradeoff_visible": e_row["prompt_fidelity"] < g_row["prompt_fidelity"],
        "plot": str(out / "tradeoff.png"),
    }
    # With a confirmation pass, the target is judged on the fresh seeds, not on the sweep's best.
    judged = confirmed or result
    result["confirmed"] = confirmed
    result["target_met"] = judged["prompt_ratio_to_g"] >= 0.9 and judged["subject_ratio_to_e"] >= 0.9
    if confirmed:
        print(f"confirmed on seeds {confirmed['seeds'][0]}..{confirmed['seeds'][1]}: "  # noqa: T201
              f"G {confirmed['g_prompt_fidelity']:.2f}/{confirmed['g_subject_fidelity']:.3f}, "
              f"E {confirmed['e_prompt_fidelity']:.2f}/{confirmed['e_subject_fidelity']:.3f}, "
              f"DreamBlend a={confirmed['alpha']} K={confirmed['window']} {confirmed['schedule']} "
              f"{confirmed['dreamblend_prompt_fidelity']:.2f}/{confirmed['dreamblend_subject_fidelity']:.3f}: "
              f"ratios {confirmed['prompt_ratio_to_g']:.2f} / {confirmed['subject_ratio_to_e']:.2f}; "
              f"subject ratio within reach of steering E: {confirmed['subject_ratio_bound']}")
    (out / "tradeoff.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "images"} for r in rows], indent=2))
    print("RESULT " + json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()

"""Is the attention collapse real, and does a judge-free pair choice built on it work?

On the embedded demo subjects (the demo's full-UNet recipe, checkpoints at 25..800 steps; reused
when already fine-tuned with the same settings, as toy_tradeoff.py does):

1. the attention probe (``evaluation/collapse.py``, the fine-tune job's ``--attention-probe``) on
   the base model and every checkpoint: the collapse score and the subject map's sharpness;
2. every checkpoint sampled alone on the subject-beside-a-second-object prompts, scored by the
   embedded model's exact analytic metrics: prompt fidelity (the second object drawn right) and
   subject fidelity;
3. the questions: does collapse rise with the steps (Spearman rank correlation), and does it rise
   before prompt fidelity falls (the first step past half the collapse rise, against the first
   step whose prompt fidelity is 10% under the base model's);
4. three pair choices: ``attention`` (the probe alone, at a few tolerances), ``embedded`` (the
   analytic metrics: ``pair_choice.choose_pair`` on step 2's scores, what ``--choose-pair
   embedded`` computes) and the fixed rule (``FinetuneConfig``'s default: G nearest 25% of the
   run, E the last step); each chosen pair's DreamBlend images (the demo's alpha and window) on
   fresh seeds, scored the same way.

Prints the tables; the last line is ``RESULT {json}``.

    python benchmarks/attention_collapse.py [--subjects striped-star,checkered-heart,half-ring]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_tradeoff import ensure_subject, measure  # noqa: E402 - a sibling benchmark's helpers

import dreamblend_ray.embedded.scorer  # noqa: E402,F401 - registers the embedded probe prompts
from dreamblend_ray.config import FinetuneConfig, SamplingConfig  # noqa: E402
from dreamblend_ray.embedded.subjects import SUBJECTS, get_subject  # noqa: E402
from dreamblend_ray.evaluation import collapse  # noqa: E402
from dreamblend_ray.evaluation.pair_choice import choose_pair  # noqa: E402
from dreamblend_ray.method.pair import single  # noqa: E402
from dreamblend_ray.method.sampler import DreamBlendSampler  # noqa: E402
from dreamblend_ray.models.components import load_components  # noqa: E402
from dreamblend_ray.training import checkpoints  # noqa: E402

logger = logging.getLogger("attention_collapse")
EVAL_SEED0 = 1000  # the choices are scored on seeds far from the checkpoint scores' 0..n-1
PROBED = ("collapse", "sharpness", "subject_mass", "correlation")  # the probe's measures in the tables


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values):
        order = np.argsort(values, kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values), dtype=float)
        for value in set(values):
            tied = [i for i, v in enumerate(values) if v == value]
            out[tied] = out[tied].mean()
        return out
    rx, ry = ranks(list(x)), ranks(list(y))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def first_step(rows: list[dict], predicate) -> int | None:
    return next((row["step"] for row in rows if predicate(row)), None)


def finetune_config(subject, saved: tuple[int, ...], steps: int) -> FinetuneConfig:
    """The demo's recipe (demo.DemoConfig) with the study's denser checkpoints."""
    return FinetuneConfig(method="full", steps=steps, learning_rate=3e-4, rank=16, batch_size=4,
                          checkpoint_steps=saved, guidance_step=50 if 50 in saved else None, token=subject.token,
                          prior_preservation=False, num_class_images=0)


def fixed_rule(saved: list[int], steps: int) -> tuple[int, int]:
    """FinetuneConfig's default pair: G nearest guidance_fraction (25%) of the run, E the last step."""
    return FinetuneConfig(steps=steps, checkpoint_steps=tuple(saved)).default_pair()


def checkpoint_scores(sampler, components, root, subject, prompts, seeds, config) -> tuple[dict, list[dict]]:
    """Prompt and subject fidelity of the base model and of every saved checkpoint alone."""
    base = measure(sampler, single(components.unet), subject, prompts, seeds, config)
    rows = []
    for step in checkpoints_of(root, subject):
        pair, _ = checkpoints.load_pair(root, subject.subject_id, components, step, step)
        try:
            rows.append({"step": step, **measure(sampler, pair, subject, prompts, seeds, config)})
        finally:
            checkpoints.unload_pair(pair, components)
        logger.info("%s step %d: prompt %.3f subject %.3f", subject.subject_id, step,
                    rows[-1]["prompt_fidelity"], rows[-1]["subject_fidelity"])
    return base, rows


def checkpoints_of(root, subject) -> list[int]:
    from dreamblend_ray.training import layout

    return list(layout.read_manifest(root, subject.subject_id)["steps"])


def blend_scores(sampler, components, root, subject, prompts, seeds, pair_steps, config) -> dict:
    pair, _ = checkpoints.load_pair(root, subject.subject_id, components, *pair_steps)
    try:
        scores = measure(sampler, pair, subject, prompts, seeds, config)
    finally:
        checkpoints.unload_pair(pair, components)
    return {k: scores[k] for k in ("prompt_fidelity", "subject_fidelity")}


def study_subject(args, components, sampler, subject_id: str) -> dict:
    subject = get_subject(subject_id)
    saved = tuple(int(s) for s in args.checkpoints.split(",") if int(s) <= args.finetune_steps)
    root = str(Path(args.out) / "storage")
    ensure_subject(components, subject, root, finetune_config(subject, saved, args.finetune_steps))
    images = subject.instance_images()
    probe_prompts = collapse.probe_prompts(components, images, subject.class_noun, subject.token)
    probe = collapse.probe_checkpoints(root, subject_id, components, probe_prompts,
                                       list(range(args.probe_seeds)), steps=args.probe_steps)
    prompts = subject.context_prompts("companion", args.contexts)
    plain = SamplingConfig(num_inference_steps=args.steps, guidance_scale=3.0, alpha=0.0)
    base, rows = checkpoint_scores(sampler, components, root, subject, prompts, list(range(args.seeds)), plain)
    by_step = {r["step"]: r for r in probe["rows"]}
    table = [{"step": r["step"], **{m: by_step[r["step"]][m] for m in PROBED},
              "prompt_fidelity": r["prompt_fidelity"], "subject_fidelity": r["subject_fidelity"]} for r in rows]
    base_row = {**{m: probe["base"][m] for m in PROBED},
                "prompt_fidelity": base["prompt_fidelity"], "subject_fidelity": base["subject_fidelity"]}
    choices = pair_choices(args, probe, table, base_row, list(saved))
    blend = SamplingConfig(num_inference_steps=args.steps, guidance_scale=3.0, alpha=args.alpha,
                           guidance_fraction=args.fraction)
    fresh = list(range(EVAL_SEED0, EVAL_SEED0 + args.eval_seeds))
    scored = {}
    for pair_steps in sorted({tuple(c["pair"]) for c in choices.values()}):
        scored[pair_steps] = blend_scores(sampler, components, root, subject, prompts, fresh, pair_steps, blend)
    for choice in choices.values():
        choice.update(scored[tuple(choice["pair"])])
    return {"subject": subject_id, "base": base_row, "checkpoints": table, "choices": choices,
            **collapse_questions(table, base_row)}


def collapse_questions(table: list[dict], base: dict) -> dict:
    steps = [r["step"] for r in table]
    top = max(r["collapse"] for r in table)
    half_rise = base["collapse"] + 0.5 * max(0.0, top - base["collapse"])
    fidelity_floor = base["prompt_fidelity"] - 0.1 * abs(base["prompt_fidelity"])
    return {"spearman_collapse_step": spearman(steps, [r["collapse"] for r in table]),
            "spearman_collapse_prompt_fidelity": spearman([r["collapse"] for r in table],
                                                          [r["prompt_fidelity"] for r in table]),
            **{f"spearman_{m}_step": spearman(steps, [r[m] for r in table]) for m in PROBED[1:]},
            "collapse_half_rise_step": first_step(table, lambda r: r["collapse"] >= half_rise),
            "prompt_fidelity_drop_step": first_step(table, lambda r: r["prompt_fidelity"] < fidelity_floor),
            "collapse_rise": top - base["collapse"]}


def pair_choices(args, probe, table, base_row, saved) -> dict:
    choices = {}
    fixed = fixed_rule(saved, args.finetune_steps)
    for tolerance in (float(t) for t in args.tolerances.split(",")):
        # as the job does, the fine-tune's default pair (here the fixed rule) when no collapse shows
        chosen = collapse.choose_pair_by_attention(probe["rows"], probe["base"], tolerance, default=fixed)
        choices[f"attention@{tolerance:g}"] = {"pair": [chosen["guidance_step"], chosen["edit_step"]],
                                               "collapsed": chosen["collapsed"]}
    embedded = choose_pair([{k: r[k] for k in ("step", "prompt_fidelity", "subject_fidelity")} for r in table],
                           base_row["prompt_fidelity"], 0.1)
    choices["embedded"] = {"pair": [embedded["guidance_step"], embedded["edit_step"]]}
    choices["fixed"] = {"pair": list(fixed)}
    return choices


def before(result: dict) -> bool | None:
    """Does collapse pass half its rise before prompt fidelity falls 10% under the base? None when
    the score does not rise with the steps (Spearman <= 0.5): then there is no onset to compare."""
    steps = (result["collapse_half_rise_step"], result["prompt_fidelity_drop_step"])
    if result["spearman_collapse_step"] <= 0.5 or None in steps:
        return None
    return steps[0] <= steps[1]


def print_subject(result: dict) -> None:
    base = result["base"]
    print(f"\n== {result['subject']}: the probe's measures and the analytic fidelities per checkpoint")
    print(f"{'step':>5} {'collapse':>9} {'sharpness':>9} {'subj.mass':>9} {'corr':>7} {'prompt':>7} {'subject':>7}")
    for r in [{"step": "base", **base}, *result["checkpoints"]]:
        print(f"{r['step']:>5} {r['collapse']:>9.3f} {r['sharpness']:>9.4f} {r['subject_mass']:>9.3f} "
              f"{r['correlation']:>7.3f} {r['prompt_fidelity']:>7.3f} {r['subject_fidelity']:>7.3f}")
    print(f"Spearman(collapse, step) {result['spearman_collapse_step']:+.2f}; "
          f"Spearman(collapse, prompt fidelity) {result['spearman_collapse_prompt_fidelity']:+.2f}; "
          f"collapse past half its rise at step {result['collapse_half_rise_step']}, prompt fidelity 10% "
          f"under the base from step {result['prompt_fidelity_drop_step']}")
    print(f"{'choice':>16} {'G':>5} {'E':>5} {'prompt':>7} {'subject':>7} {'mean':>6}")
    for name, c in result["choices"].items():
        print(f"{name:>16} {c['pair'][0]:>5} {c['pair'][1]:>5} {c['prompt_fidelity']:>7.3f} "
              f"{c['subject_fidelity']:>7.3f} {(c['prompt_fidelity'] + c['subject_fidelity']) / 2:>6.3f}")


def summary(results: list[dict]) -> dict:
    names = list(results[0]["choices"])
    mean = {name: {k: float(np.mean([r["choices"][name][k] for r in results]))
                   for k in ("prompt_fidelity", "subject_fidelity")} for name in names}
    for scores in mean.values():
        scores["mean"] = (scores["prompt_fidelity"] + scores["subject_fidelity"]) / 2
    return {"subjects": [r["subject"] for r in results],
            "collapse_rise": {r["subject"]: round(r["collapse_rise"], 4) for r in results},
            "spearman_step": {r["subject"]: {m: round(r[f"spearman_{m}_step"], 3) for m in PROBED}
                              for r in results},
            "collapse_before_fidelity_drop": {r["subject"]: before(r) for r in results},
            "choices_mean": {n: {k: round(v, 4) for k, v in s.items()} for n, s in mean.items()},
            "attention_vs_fixed": {n: ratio(mean[n]["mean"], mean["fixed"]["mean"])
                                   for n in names if n.startswith("attention")},
            "embedded_vs_fixed": ratio(mean["embedded"]["mean"], mean["fixed"]["mean"])}


def ratio(value: float, reference: float) -> float | None:
    return round(value / reference, 4) if reference else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", default=",".join(s.subject_id for s in SUBJECTS))
    parser.add_argument("--out", default="outputs/attention_study")
    parser.add_argument("--finetune-steps", type=int, default=800)
    parser.add_argument("--checkpoints", default="25,50,100,200,300,400,600,800")
    parser.add_argument("--contexts", type=int, default=3, help="second-object prompts per subject")
    parser.add_argument("--seeds", type=int, default=6, help="seeds per prompt for each checkpoint's scores")
    parser.add_argument("--eval-seeds", type=int, default=8, help="fresh seeds per prompt for each choice")
    parser.add_argument("--probe-seeds", type=int, default=2)
    parser.add_argument("--probe-steps", type=int, default=collapse.PROBE_STEPS)
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps of the scored images")
    parser.add_argument("--alpha", type=float, default=0.5, help="the demo's DreamBlend strength")
    parser.add_argument("--fraction", type=float, default=0.6, help="the demo's guidance window")
    parser.add_argument("--tolerances", default="0.1,0.25,0.5")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    components = load_components("embedded")
    sampler = DreamBlendSampler(components)
    results = []
    for subject_id in args.subjects.split(","):
        results.append(study_subject(args, components, sampler, subject_id))
        print_subject(results[-1])
    headline = summary(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_collapse.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    print("\nmean over subjects:", json.dumps(headline["choices_mean"]))
    print("RESULT " + json.dumps(headline))


if __name__ == "__main__":
    main()

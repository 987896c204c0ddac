"""``dreamblend demo``: the README's main job (see dreamblend_ray/demo.py).

Fine-tunes the demo subjects on the embedded model with the Ray Data job, serves them with Ray
Serve, requests new-context images over HTTP, and writes outputs/demo/grid.png and report.md.
A second run reuses the finished subjects.
"""

import argparse

from dreamblend_ray.demo import DemoConfig, run_demo
from dreamblend_ray.embedded.subjects import CONTEXTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output directory (default outputs/demo)")
    parser.add_argument("--base", default="embedded", help="base model (default: the embedded model)")
    parser.add_argument("--subjects", nargs="*", default=[], help="demo subject ids (default: all)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps per subject")
    parser.add_argument("--method", choices=("lora", "full"), default=None,
                        help="fine-tune recipe: LoRA on every attention projection (default) or the "
                             "full UNet (the earlier recipe)")
    parser.add_argument("--lr", type=float, default=None,
                        help="fine-tune learning rate (default: the method's, 2e-3 LoRA / 3e-4 full)")
    parser.add_argument("--alpha", type=float, default=None, help="DreamBlend strength")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps per image")
    parser.add_argument("--eta-schedule", default=None,
                        help="DreamBlend's step size over the guided steps: constant (default), linear, cosine")
    parser.add_argument("--seeds", type=int, default=None,
                        help="images per prompt and column, seeds 0..N-1 (default 3; more seeds make the "
                             "figures finer: one image moves prompt fidelity by 1/(9 N))")

    parser.add_argument("--context", choices=CONTEXTS, default=None,
                        help="what the new prompts add: a second, named object (default) or a new "
                             "background colour")
    parser.add_argument("--contexts", "--backgrounds", dest="contexts", type=int, default=None,
                        help="new contexts per subject (default 3)")
    parser.add_argument("--attention-maps", action=argparse.BooleanOptionalAction, default=None,
                        help="one cross-attention heat-map grid per subject in the report (default: on)")
    parser.add_argument("--attention-probe", action=argparse.BooleanOptionalAction, default=None,
                        help="the fine-tune job's attention-collapse probe, its plot and figures in the "
                             "report (default: on)")


def log_dir(args: argparse.Namespace) -> str:
    """The demo's log file goes beside its outputs."""
    return args.out


def run(args: argparse.Namespace) -> int:

    values = {"out": args.out, "base": args.base, "subjects": tuple(args.subjects)}
    for name, key in (("finetune_steps", "finetune_steps"), ("method", "method"), ("lr", "learning_rate"),
                      ("alpha", "alpha"), ("steps", "steps"), ("eta_schedule", "eta_schedule"),
                      ("context", "context"), ("contexts", "contexts_per_subject"),
                      ("attention_maps", "attention_maps"), ("attention_probe", "attention_probe")):
        if getattr(args, name) is not None:
            values[key] = getattr(args, name)
    if args.seeds is not None:
        values["seeds"] = tuple(range(args.seeds))
    run_demo(DemoConfig(**values))
    return 0

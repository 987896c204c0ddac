"""The gates a new embedded base must pass before it replaces the shipped weights.

``python -m dreamblend_ray.embedded.gates --model DIR [--baseline embedded | --baseline-json F]``
measures a model as TRAINING.md's quality figures are measured (:mod:`.evaluate`: plain DDIM, 30
steps, the 12 held-out combinations x 4 seeds and 48 seeded two-object prompts, at CFG 3) and
checks it against absolute floors and against the baseline (today's model):

- held-out single objects, all asked attributes pooled (``overall``): at least ``min_held_out``
  (99%) and at least the baseline's;
- two-object prompts with both named shapes drawn: at least ``min_pairs`` (60%) and at least the
  baseline's.

It prints one JSON object (the figures of both models, each check and ``passed``) and exits 0 when
every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dreamblend_ray.config import check_range
from dreamblend_ray.embedded import evaluate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    """How the gates measure a model and where they put the bar."""

    guidance_scale: float = 3.0
    steps: int = 30
    per_combo: int = 4
    pairs: int = 48
    min_held_out: float = 0.99
    min_pairs: float = 0.60

    def __post_init__(self):
        check_range("guidance_scale", self.guidance_scale, 0.0, 50.0)
        check_range("steps", self.steps, 1, 1000)
        check_range("per_combo", self.per_combo, 1, 1000)
        check_range("pairs", self.pairs, 1, 10 ** 5)
        check_range("min_held_out", self.min_held_out, 0.0, 1.0)
        check_range("min_pairs", self.min_pairs, 0.0, 1.0)


def measure(components, config: GateConfig = GateConfig()) -> dict:
    """The gate figures of one model: held-out ``overall`` and pairs ``both_shapes`` (plus the
    rest of each :func:`evaluate.evaluate` report, for the record)."""
    held, _ = evaluate.evaluate(components, *evaluate.held_out_prompts(config.per_combo),
                                config.steps, config.guidance_scale)
    pairs, _ = evaluate.evaluate(components, *evaluate.pair_prompts(config.pairs),
                                 config.steps, config.guidance_scale)
    return {"held_out": held["prompt_fidelity"]["overall"],
            "both_shapes": pairs["prompt_fidelity"]["shape"],
            "both_colours": pairs["prompt_fidelity"]["colour"],
            "held_out_report": held["prompt_fidelity"], "pairs_report": pairs["prompt_fidelity"]}


def verdict(candidate: dict, baseline: dict | None, config: GateConfig = GateConfig()) -> dict:
    """Each check (name -> bool) and ``passed``; the baseline checks only when one is given."""
    checks = {"held_out >= floor": candidate["held_out"] >= config.min_held_out,
              "both_shapes >= floor": candidate["both_shapes"] >= config.min_pairs}
    if baseline is not None:
        checks["held_out >= baseline"] = candidate["held_out"] >= baseline["held_out"]
        checks["both_shapes >= baseline"] = candidate["both_shapes"] >= baseline["both_shapes"]
    return {"checks": checks, "passed": all(checks.values())}


def _figures(model: str, config: GateConfig) -> dict:
    from dreamblend_ray.models.components import load_components

    logger.info("measuring %s", model)
    return {"model": model, **measure(load_components(model), config)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the candidate: a model directory or 'embedded'")
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", default="embedded", help="the model to beat (default: embedded)")
    baseline.add_argument("--baseline-json", default=None,
                          help="a previous run's output whose 'candidate' figures are the baseline")
    parser.add_argument("--no-baseline", action="store_true", help="check the floors only")
    parser.add_argument("--threads", type=int, default=1)
    for name, value in asdict(GateConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"default {value}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    try:
        config = GateConfig(**{name: getattr(args, name) for name in asdict(GateConfig())})
    except ValueError as error:
        parser.error(str(error))
    candidate = _figures(args.model, config)
    if args.no_baseline:
        base = None
    elif args.baseline_json:
        base = json.loads(Path(args.baseline_json).read_text())["candidate"]
    else:
        base = _figures(args.baseline, config)
    result = {"config": asdict(config), "candidate": candidate, "baseline": base,
              **verdict(candidate, base, config)}
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The demo's figures as ``metrics.json`` records them, and whether a run reproduces a recorded one.

``metrics.json`` holds, per column (G alone, E alone, DreamBlend), the figures rounded to
``DIGITS`` decimals, each image's prompt and subject score, and the figures of each seed alone
(their spread), with the settings that produced them. Timings live in ``timings.json``: two runs
on one machine write the same ``metrics.json``.

Another machine's floating point changes a few images (DreamBlend's latent updates amplify
rounding: one or two of 27 images flipped between two 2-core machines, issue 32), so a run
*reproduces* the recorded one (``dreamblend_ray/data/demo_metrics.json``, the README's figures) when
each column's figure lies within ``tolerance`` of the recorded one: what ``FLIPS`` images changing
across the whole range of one image's score can move a mean over n images. For prompt fidelity
that range is a verdict (0 to 1), for subject fidelity the span the recorded images' scores cover.
With 27 images a column that is 0.11 of prompt fidelity: another machine passes, a sampler whose
guidance stopped working (DreamBlend at E's 0.41 instead of 0.63) does not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

RECORDED = Path(__file__).parent / "data" / "demo_metrics.json"
DIGITS = 4  # metrics.json's precision; the report prints 2-3 decimals
FLIPS = 3  # images another machine may change; 1-2 measured between two machines (issue 32)
# figure -> (per-image key, the range one image's score can move over: None = the recorded span)
FIGURES = {"prompt_fidelity": ("prompt", 1.0), "subject_fidelity": ("subject", None)}


def rounded(value: float) -> float:
    return round(float(value), DIGITS)


def seed_figures(prompt: Sequence[float], subject: Sequence[float], seeds: Sequence[int]) -> dict:
    """Each seed's prompt and subject fidelity over its own images, and their spread.

    prompt, subject: per-image scores ordered cell by cell, ``len(seeds)`` images a cell (one
    per seed, in ``seeds``' order)."""
    k = len(seeds)
    if k == 0 or len(prompt) != len(subject) or len(prompt) % k:
        raise ValueError(f"{len(prompt)} prompt and {len(subject)} subject scores do not split into {k} seeds")
    per_seed = {str(seed): {"prompt_fidelity": rounded(np.mean(prompt[j::k])),
                            "subject_fidelity": rounded(np.mean(subject[j::k]))}
                for j, seed in enumerate(seeds)}
    spread = {name: [min(s[name] for s in per_seed.values()), max(s[name] for s in per_seed.values())]
              for name in FIGURES}
    return {"per_seed": per_seed, "range": spread}


def column_record(figures: dict, prompt: Sequence[float], subject: Sequence[float], seeds: Sequence[int]) -> dict:
    """One column of ``metrics.json``: ``figures`` rounded, the per-image scores, the seeds' spread."""
    return {**{name: (rounded(v) if isinstance(v, float) else v) for name, v in figures.items()},
            "per_image": {"prompt": [rounded(v) for v in prompt], "subject": [rounded(v) for v in subject]},
            "seeds": seed_figures(prompt, subject, seeds)}


def tolerance(recorded_column: dict, figure: str) -> float:
    """How far a run's ``figure`` may lie from the recorded column's: FLIPS images, each moving
    across one image's range (``FIGURES``), over the column's n images."""
    key, scale = FIGURES[figure]
    values = recorded_column["per_image"][key]
    if not values:
        raise ValueError(f"the recorded column has no per-image {key} scores")
    if scale is None:
        scale = max(values) - min(values)
    return FLIPS * scale / len(values)


@dataclass(frozen=True)
class Check:
    """One figure of one column against the recorded run."""

    column: str
    figure: str
    run: float
    recorded: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return abs(self.run - self.recorded) <= self.tolerance + 10 ** -DIGITS  # both sides are rounded

    def line(self) -> str:
        return (f"| {self.column} | {self.figure.replace('_', ' ')} | {self.run:.3f} | {self.recorded:.3f} | "
                f"{self.tolerance:.3f} | {'yes' if self.ok else '**no**'} |")


def read_recorded(path: Path = RECORDED) -> dict | None:
    """The recorded ``metrics.json``; None when none ships (a fork that has not recorded one)."""
    return json.loads(path.read_text()) if path.exists() else None


def compare(run: dict, recorded: dict) -> list[Check]:
    """Every column's figures of ``run`` against ``recorded`` (both ``metrics.json`` contents).

    Raises ValueError when they were made with different settings: their figures say nothing
    about each other then."""
    if run["settings"] != recorded["settings"]:
        differ = sorted(k for k in set(run["settings"]) | set(recorded["settings"])
                        if run["settings"].get(k) != recorded["settings"].get(k))
        raise ValueError(f"the runs' settings differ ({', '.join(differ)}): nothing to compare")
    return [Check(column, figure, run["columns"][column][figure], rec[figure], tolerance(rec, figure))
            for column, rec in recorded["columns"].items() for figure in FIGURES]


def comparison_markdown(run: dict, recorded: dict | None) -> str:
    """The report's section on the recorded run: the table of checks, or why there is none."""
    lines = ["", "## Against the recorded run", ""]
    if recorded is None:
        return "\n".join(lines + ["No recorded run ships with this copy.", ""])
    try:
        checks = compare(run, recorded)
    except ValueError as err:
        return "\n".join(lines + [f"Not compared: {err}. The recorded run used the demo's defaults.", ""])
    verdict = ("reproduces it" if all(c.ok for c in checks) else
               "does **not** reproduce it: a figure lies further from the recorded one than "
               f"{FLIPS} images changing could move it")
    lines += [f"The recorded run ({recorded.get('recorded', 'date not recorded')}, "
              f"`dreamblend_ray/data/demo_metrics.json`): this run {verdict}. Tolerance: {FLIPS} images "
              "of the column changing across one image's range (a verdict for prompt fidelity, the "
              "recorded scores' span for subject fidelity).", "",
              "| column | figure | this run | recorded | tolerance | within |", "|---|---|---|---|---|---|"]
    lines += [check.line() for check in checks]
    for check in checks:
        if not check.ok:
            logger.warning("%s %s: %.3f against the recorded %.3f (tolerance %.3f)", check.column,
                           check.figure, check.run, check.recorded, check.tolerance)
    return "\n".join(lines + [""])

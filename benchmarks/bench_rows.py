"""Cross-subject batching in one process: DreamBlend rows (``method/rows.py``) vs today's sampler
calls per subject, on the tiny model and the CPU.

N subjects, each a pair of random LoRA adapters (G, E: rank 4 on ``to_q``, ``to_k``, ``to_v``,
``to_out.0``) on one base UNet, and ``--images`` images (one per request; image ``b`` is subject
``b % N``'s, seed ``b``). At each N of ``--subjects`` the same images are made three ways:

- ``per-subject``: one ``DreamBlendSampler.sample`` call per subject with its images (today's
  service: 16 subjects -> 16 calls of one image; at N = 1 it is the single-subject batch, the
  batching today's service gets only when every request shares one subject),
- ``rows``: every image a row of one ``RowEngine.run`` (``co_batch=False``, peft's mixed-batch adapters),
- ``rows co_batch``: the same with G's next step inside E's UNet call (``co_batch=True``),
- ``rows gather solo`` / ``rows gather``: ``adapter_method="gather"`` (every row's LoRA A and B
  gathered into two batched matmuls per layer, instead of peft's one sub-batch per adapter), without
  and with co_batch. ``rows gather`` is the engine's default.

N = 1 always runs: it is the single-subject reference and the rows-on-one-adapter baseline of the
per-row LoRA overhead. Every variant first runs a short warm-up (2 steps, 1 guided: the first calls
at its batch shapes), then ``--repeats`` timed rounds, the variants interleaved round by round so
that load on a shared machine falls on all of them; the median counts. The first round's images
are the sanity check: the rows' max abs difference from the per-subject images, in 8-bit levels,
should be <= 1 (batch invariance). ``row setup s`` is what ``RowEngine.start`` costs for all rows
(text encoding, noise), measured once apart; the timed rows runs include it.

Prints a table and, last, ``RESULT {json}`` with images/s per (N, variant) and the ratios:
``rows_to_per_subject`` (the best rows variant vs per-subject, at the largest N),
``rows_to_single_subject_batch`` (the same rows vs per-subject at N = 1),
``co_batch_to_no_co_batch`` (gathered rows' images/s with co_batch over without, at the largest N;
``faster_on_cpu`` names the faster mode; ``..._peft_by_subjects`` the same with peft's adapters)
and ``per_row_lora_overhead`` (s/image of rows with N distinct subjects over rows on one subject,
the faster mode at the largest N); and for the adapter method, ``gather_to_peft`` (images/s of
``rows gather`` over ``rows co_batch``, at the largest N) and ``per_row_lora_overhead_gather``.
Measures; never passes or fails on time.

The default run takes ~5 min on the shared 2-core machine (7 min under heavy load); figures move
by up to ~1.5x between quiet and loaded periods, the ratios within one run much less (interleaved).

    .venv/bin/python benchmarks/bench_rows.py                       # 16 images, N = 1, 4, 16, 10 steps
    .venv/bin/python benchmarks/bench_rows.py --subjects 16 --repeats 5   # N = 1 and 16, 5 rounds (~6 min)
    .venv/bin/python benchmarks/bench_rows.py --images 2 --subjects 1 2 --steps 2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from peft import LoraConfig

from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.method.pair import AdapterPair
from dreamblend_ray.method.rows import RowEngine, RowRequest
from dreamblend_ray.method.sampler import DreamBlendSampler
from dreamblend_ray.models.components import Components, load_components

logger = logging.getLogger("bench_rows")
PROMPTS = ("a photo of sks dog on the beach", "a red cat in the snow", "a toy on a table",
           "a photo of sks dog in a forest")
LORA = {"r": 4, "lora_alpha": 4, "init_lora_weights": "gaussian",
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
PER_SUBJECT, ROWS, ROWS_CO = "per-subject", "rows", "rows co_batch"
ROWS_GATHER_SOLO, ROWS_GATHER = "rows gather solo", "rows gather"
VARIANTS = (PER_SUBJECT, ROWS, ROWS_CO, ROWS_GATHER_SOLO, ROWS_GATHER)


@dataclass(frozen=True)
class Image:
    """One request: its prompt, seed and subject index."""

    prompt: str
    seed: int
    subject: int


def add_subjects(unet, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` subjects as (G, E) adapter names on ``unet``, lora_B drawn N(0, 0.3) per adapter."""
    pairs = []
    for k in range(count):
        pair = (f"g{k}", f"e{k}")
        for offset, name in enumerate(pair):
            with warnings.catch_warnings():  # peft warns that a second adapter is one more adapter
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                unet.add_adapter(LoraConfig(**LORA), adapter_name=name)
            generator = torch.Generator().manual_seed(seed + 2 * k + offset)
            with torch.no_grad():
                for pname, param in unet.named_parameters():
                    if "lora_B" in pname and f".{name}." in pname:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        pairs.append(pair)
    unet.requires_grad_(False)
    return pairs


def workload(images: int, subjects: int) -> list[Image]:
    return [Image(PROMPTS[b % len(PROMPTS)], b, b % subjects) for b in range(images)]


def per_subject(components: Components, pairs, work: list[Image], config: SamplingConfig):
    """Today's path: one sampler call per subject with all of its images."""
    sampler = DreamBlendSampler(components)

    def run() -> np.ndarray:
        out = [None] * len(work)
        for k in sorted({image.subject for image in work}):
            index = [b for b, image in enumerate(work) if image.subject == k]
            result = sampler.sample(AdapterPair(components.unet, *pairs[k]), [work[b].prompt for b in index],
                                    [work[b].seed for b in index], config)
            for b, array in zip(index, result.arrays):
                out[b] = array
        return np.stack(out)
    return run


def row_requests(pairs, work: list[Image], config: SamplingConfig) -> list[RowRequest]:
    return [RowRequest(image.prompt, image.seed, config, *pairs[image.subject]) for image in work]


def rows(components: Components, pairs, work: list[Image], config: SamplingConfig, co_batch: bool,
         adapter_method: str = "peft"):
    """Every image a row of one RowEngine.run, each with its subject's adapters."""
    engine = RowEngine(components, co_batch=co_batch, adapter_method=adapter_method)
    requests = row_requests(pairs, work, config)
    return lambda: engine.run(requests)[0]


def row_setup_seconds(components: Components, pairs, work: list[Image], config: SamplingConfig) -> float:
    """Seconds RowEngine.start takes for every row (text encoding, noise), once, outside the timed runs."""
    engine, requests = RowEngine(components), row_requests(pairs, work, config)
    start = time.perf_counter()
    engine.start_many(requests)
    return time.perf_counter() - start


def factories(components: Components, pairs, images: int, counts: list[int]) -> dict:
    """(N, variant) -> a function of the SamplingConfig that returns the variant's run()."""
    out = {}
    for n in counts:
        work = workload(images, n)
        out[(n, PER_SUBJECT)] = partial(per_subject, components, pairs, work)
        out[(n, ROWS)] = partial(rows, components, pairs, work, co_batch=False)
        out[(n, ROWS_CO)] = partial(rows, components, pairs, work, co_batch=True)
        out[(n, ROWS_GATHER_SOLO)] = partial(rows, components, pairs, work, co_batch=False, adapter_method="gather")
        out[(n, ROWS_GATHER)] = partial(rows, components, pairs, work, co_batch=True, adapter_method="gather")
    return out


class CallCounter:
    """Counts the UNet's forward calls (the guidance pass's early-stopped call included)."""

    def __init__(self, unet):
        self.calls = 0
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def measure(variants: dict, config: SamplingConfig, repeats: int, counter: CallCounter) -> tuple[dict, dict, dict]:
    """A short warm-up per variant, then ``repeats`` interleaved rounds: the first round's images and
    UNet calls, and each variant's median seconds."""
    warm = SamplingConfig(num_inference_steps=min(2, config.num_inference_steps), alpha=config.alpha,
                          guidance_steps=1)
    for factory in variants.values():
        factory(warm)()  # first calls at these batch shapes, guidance and co_batch paths included
    runs = {key: factory(config) for key, factory in variants.items()}
    images, calls, times = {}, {}, {key: [] for key in runs}
    for round_ in range(repeats):
        for key, run in runs.items():
            before, start = counter.calls, time.perf_counter()
            out = run()
            times[key].append(time.perf_counter() - start)
            if round_ == 0:
                images[key], calls[key] = out, counter.calls - before
    return images, calls, {key: statistics.median(values) for key, values in times.items()}


def build_rows(images_count: int, seconds, images, calls, setup, counts) -> dict:
    """Per (N, variant): median s, images/s, UNet calls, ratio to per-subject, max |diff| x255, and
    for rows the seconds of their setup (RowEngine.start of every row, in the timed run too)."""
    table = {}
    for n in counts:
        reference = images[(n, PER_SUBJECT)]
        for variant in VARIANTS:
            key = (n, variant)
            table[key] = {
                "seconds": seconds[key], "images_per_s": images_count / seconds[key], "unet_calls": calls[key],
                "to_per_subject": seconds[(n, PER_SUBJECT)] / seconds[key],
                "max_abs_diff_x255": float(np.abs(images[key] - reference).max() * 255),
                "row_setup_s": None if variant == PER_SUBJECT else setup[n]}
    return table


def print_table(args, table: dict, threads: int) -> None:
    header = (f"{'subjects':>8s} {'variant':16s} {'unet calls':>10s} {'median s':>9s} {'images/s':>9s} "
              f"{'x per-subj':>10s} {'max|d|x255':>10s} {'row setup s':>11s}")
    title = (f"base={args.base} images={args.images} steps={args.steps} alpha={args.alpha} "
             f"repeats={args.repeats} threads={threads} device=cpu")
    lines = [title, header, "-" * len(header)]
    for (n, variant), row in table.items():
        setup = "" if row["row_setup_s"] is None else f"{row['row_setup_s']:.3f}"
        lines.append(f"{n:8d} {variant:16s} {row['unet_calls']:10d} {row['seconds']:9.3f} "
                     f"{row['images_per_s']:9.2f} {row['to_per_subject']:10.2f} {row['max_abs_diff_x255']:10.4f} "
                     f"{setup:>11s}")
    print("\n".join(lines))  # noqa: T201 - a benchmark prints its table


def headline(table: dict, counts: list[int]) -> dict:
    """The ratios of the issue, at the largest subject count ``top``."""
    top = counts[-1]
    best = max(VARIANTS[1:], key=lambda v: table[(top, v)]["images_per_s"])
    rate = {key: row["images_per_s"] for key, row in table.items()}
    co_ratio = rate[(top, ROWS_GATHER)] / rate[(top, ROWS_GATHER_SOLO)]
    return {
        "rows_to_per_subject": round(rate[(top, best)] / rate[(top, PER_SUBJECT)], 3),
        "rows_to_single_subject_batch": round(rate[(top, best)] / rate[(1, PER_SUBJECT)], 3),
        "co_batch_to_no_co_batch": round(co_ratio, 3),
        "co_batch_to_no_co_batch_by_subjects": {str(n): round(rate[(n, ROWS_GATHER)] / rate[(n, ROWS_GATHER_SOLO)], 3)
                                                 for n in counts},
        "co_batch_to_no_co_batch_peft_by_subjects": {str(n): round(rate[(n, ROWS_CO)] / rate[(n, ROWS)], 3)
                                                      for n in counts},
        "per_row_lora_overhead": round(table[(top, best)]["seconds"] / table[(1, best)]["seconds"], 3),
        "gather_to_peft": round(rate[(top, ROWS_GATHER)] / rate[(top, ROWS_CO)], 3),
        "gather_to_peft_by_subjects": {str(n): round(rate[(n, ROWS_GATHER)] / rate[(n, ROWS_CO)], 3)
                                       for n in counts},
        "per_row_lora_overhead_gather": round(table[(top, ROWS_GATHER)]["seconds"]
                                              / table[(1, ROWS_GATHER)]["seconds"], 3),
        "best_rows_mode": best,
    }


def by_subjects(table: dict, counts: list[int], name: str, digits: int = 3) -> dict:
    """``{N: {variant: table[(N, variant)][name]}}`` rounded, N as a string (JSON keys)."""
    return {str(n): {v: round(table[(n, v)][name], digits) for v in VARIANTS} for n in counts}


def summary(args, config: SamplingConfig, table: dict, setup: dict) -> dict:
    """The RESULT line's figures: per (N, variant), the headline ratios and the sanity check."""
    counts = args.counts
    ratios = headline(table, counts)
    worst = max(row["max_abs_diff_x255"] for row in table.values())
    return {
        "base": args.base, "device": "cpu", "threads": torch.get_num_threads(), "images": args.images,
        "steps": args.steps, "alpha": args.alpha, "window": config.window, "repeats": args.repeats,
        "subjects": counts,
        "images_per_s": by_subjects(table, counts, "images_per_s"),
        "median_s": by_subjects(table, counts, "seconds"),
        "unet_calls": by_subjects(table, counts, "unet_calls"),
        "max_abs_diff_x255_by_subjects": by_subjects(table, counts, "max_abs_diff_x255", 4),
        "row_setup_s": {str(n): round(setup[n], 3) for n in counts},
        "ratios": {key: value for key, value in ratios.items() if key != "best_rows_mode"},
        "best_rows_mode": ratios["best_rows_mode"],
        "faster_on_cpu": "co_batch=True" if ratios["co_batch_to_no_co_batch"] > 1 else "co_batch=False",
        "max_abs_diff_x255": round(worst, 4), "sanity_ok": worst <= 1.0,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny", help="a built-in tiny model (tiny, tiny-sd2, tiny-sdxl)")
    parser.add_argument("--images", type=int, default=16, help="images (requests), one each")
    parser.add_argument("--subjects", type=int, nargs="+", default=[1, 4, 16],
                        help="distinct subject counts (1 always runs)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    args.counts = sorted(set(args.subjects) | {1})
    if args.images < 1 or args.repeats < 1 or args.counts[0] < 1 or args.counts[-1] > args.images:
        parser.error("need images >= 1, repeats >= 1 and 1 <= subjects <= images")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    counts = args.counts
    components = load_components(args.base, device="cpu")
    pairs = add_subjects(components.unet, counts[-1])
    config = SamplingConfig(num_inference_steps=args.steps, alpha=args.alpha)
    images, calls, seconds = measure(factories(components, pairs, args.images, counts), config, args.repeats,
                                     CallCounter(components.unet))
    setup = {n: row_setup_seconds(components, pairs, workload(args.images, n), config) for n in counts}
    table = build_rows(args.images, seconds, images, calls, setup, counts)
    print_table(args, table, torch.get_num_threads())
    result = summary(args, config, table, setup)
    print("RESULT " + json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()

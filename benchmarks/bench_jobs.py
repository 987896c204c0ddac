"""Fine-tune job scaling: N tiny subjects with 1 and 2 actors vs the same fine-tunes in one process.

    .venv/bin/python benchmarks/bench_jobs.py [--subjects 4] [--steps 30]

Each actor gets 1 CPU and 1 torch thread; the plain loop also runs with 1 thread. Reported:
wall time per configuration, scaling efficiency T1 / (2 * T2) (target >= 85%), and the job's
overhead over the plain loop (T1 - T_plain) / T_plain (target < 10%); the job times include
starting the actors and loading the base model in each. Figures, never pass/fail. The last
line is `RESULT {json}`.

Ray starts its worker processes at nice 15 (RayConfig ``worker_niceness``) so the raylet and GCS
stay responsive; on a machine shared with other work that alone makes actors slower than a
plain process. The benchmark sets ``RAY_worker_niceness=0`` (unless already set) so both sides
compete on equal terms; `--keep-niceness` measures Ray's default instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_subjects(root: Path, n: int) -> list:
    from dreamblend_ray.jobs.manifests import SubjectSpec

    specs = []
    for i in range(n):
        folder = root / "images" / f"s{i}"
        folder.mkdir(parents=True)
        rng = np.random.default_rng(i)
        for k in range(3):
            array = np.zeros((32, 32, 3), np.uint8)
            array[:] = rng.integers(0, 80, 3)
            array[8:24, 8:24] = rng.integers(100, 255, 3)
            Image.fromarray(array).save(folder / f"{k}.png")
        specs.append(SubjectSpec(f"s{i}", "box", tuple(str(p) for p in sorted(folder.iterdir()))))
    return specs


def plain_loop(specs, output: str, config) -> float:
    import torch

    from dreamblend_ray.models.components import load_components
    from dreamblend_ray.training.finetune import finetune_subject

    torch.set_num_threads(1)
    start = time.perf_counter()
    components = load_components("tiny", device="cpu")
    for spec in specs:
        finetune_subject(components, list(spec.images), spec.class_noun, spec.subject_id, output, config,
                         progress=False)
    return time.perf_counter() - start


def job(specs, output: str, config, actors: int) -> tuple[float, list[dict]]:
    from dreamblend_ray.jobs.finetune import run_finetune_job
    from dreamblend_ray.jobs.common import JobResources

    start = time.perf_counter()
    result = run_finetune_job(specs, output, base="tiny", config=config, run_id=f"bench-{actors}",
                              resources=JobResources(num_actors=actors, cpus_per_actor=1, torch_threads=1))
    seconds = time.perf_counter() - start
    failed = [r for r in result.rows if r["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"benchmark subjects failed: {failed}")
    return seconds, result.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the three configurations this many times, interleaved; report the fastest")
    parser.add_argument("--keep-niceness", action="store_true", help="leave Ray's worker niceness (15)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.keep_niceness:
        os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from dreamblend_ray.config import FinetuneConfig

    config = FinetuneConfig(steps=args.steps, checkpoint_steps=(max(1, args.steps // 4), args.steps),
                            prior_preservation=False, rank=4)
    plain, one, two = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        root = Path(tmp)
        specs = make_subjects(root, args.subjects)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            for r in range(args.repeats):
                plain.append(plain_loop(specs, str(root / f"plain-{r}"), config))
                one.append(job(specs, str(root / f"one-{r}"), config, 1))
                two.append(job(specs, str(root / f"two-{r}"), config, 2))
        finally:
            ray.shutdown()
    t_plain = min(plain)
    t1, rows1 = min(one, key=lambda x: x[0])
    t2, rows2 = min(two, key=lambda x: x[0])
    per_subject = float(np.mean([r["seconds"] for r in rows1]))
    per_subject_2 = float(np.mean([r["seconds"] for r in rows2]))
    workers_2 = len({r["worker"] for r in rows2})
    # Fixed cost of a job: wall time not spent inside a subject's fine-tune (Ray Data start-up,
    # actor processes importing torch and loading the base model, results table).
    fixed_1 = t1 - sum(r["seconds"] for r in rows1)
    result = {"subjects": args.subjects, "steps": args.steps, "repeats": args.repeats, "plain_s": round(t_plain, 2),
              "job_1_actor_s": round(t1, 2), "job_2_actors_s": round(t2, 2),
              "scaling_efficiency": round(t1 / (2 * t2), 3), "overhead_vs_plain": round((t1 - t_plain) / t_plain, 3),
              "mean_subject_s_in_actor": round(per_subject, 2),
              "mean_subject_s_in_actor_2_actors": round(per_subject_2, 2), "actors_used_2": workers_2, "fixed_cost_1_actor_s": round(fixed_1, 2),
              "scaling_efficiency_excl_fixed": round((t1 - fixed_1) / (2 * max(t2 - fixed_1, 1e-9)), 3),
              "worker_niceness": os.environ.get("RAY_worker_niceness", "15 (Ray default)"), "cpus": os.cpu_count(),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(f"{'configuration':<28}{'wall s':>10}")
    print(f"{'plain loop (1 thread)':<28}{t_plain:>10.2f}")
    print(f"{'job, 1 actor x 1 CPU':<28}{t1:>10.2f}")
    print(f"{'job, 2 actors x 1 CPU':<28}{t2:>10.2f}")
    print(f"scaling efficiency 1->2 actors: {result['scaling_efficiency']:.1%} (target >= 85%)")
    print(f"job overhead vs plain loop:     {result['overhead_vs_plain']:+.1%} (target < 10%)")
    print(f"fixed job cost (start-up, model load): {fixed_1:.2f}s; efficiency without it: "
          f"{result['scaling_efficiency_excl_fixed']:.1%}")
    print(f"mean subject time inside an actor: {per_subject:.2f}s with 1 actor, {per_subject_2:.2f}s with 2 "
          f"({workers_2} actors used)")
    print(f"load average {result['load_avg_1m']}"
          f" on {result['cpus']} CPUs")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

"""Does a long static request hold the continuous batch hostage? (issue 33, "No request holds the
batch hostage")

One model replica in process (``DreamBlendModel.local``, continuous batching, the tiny model on the
CPU, two LoRA subjects fine-tuned 2 steps). A short request (``--short-steps`` DDIM steps, one
image, continuous path) is timed three ways, side by side, ``--repeats`` times each, interleaved:

- ``alone``: nothing else runs;
- ``behind maps, whole-call lock``: it arrives 2 steps into a heat-map request (``--maps-prompts``
  prompts, ``--maps-steps`` steps, ``attention_maps``: the static path) that holds the replica's UNet
  lock for its whole sampler call, as the replica did before issue 33;
- ``behind maps, step lock``: the same, with the static path taking the (FIFO) lock one step at a
  time, as the replica does now.

The issue's figure, from the Serve endpoint: a 5-step request took 0.43 s alone and 12.2 s behind a
4-prompt, 60-step ``attention_maps`` request. Prints a table and, last, ``RESULT {json}`` with the
medians and the ratios ``behind_to_alone_step_lock`` and ``behind_to_alone_whole_call`` (lower is
better; the fix aims at a short request costing a few of its own steps more, not a maps request).

    .venv/bin/python benchmarks/bench_hostage.py                      # 5-step vs 4 prompts x 60 steps
    .venv/bin/python benchmarks/bench_hostage.py --repeats 1 --maps-steps 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time

import torch

from bench_serve import make_subjects  # benchmarks/ is the script's folder
from dreamblend_ray.config import SamplingConfig
from dreamblend_ray.models.components import load_components
from dreamblend_ray.serving import batching
from dreamblend_ray.serving.app import DreamBlendModel, LoadedPair
from dreamblend_ray.serving.batching import GenerationJob
from dreamblend_ray.serving.requests import AppArgs

logger = logging.getLogger("bench")
VARIANTS = ("alone", "behind maps, whole-call lock", "behind maps, step lock")


def whole_call_sample(replica, handle: LoadedPair, jobs, callback):
    """The static path as it was: the UNet lock held for the whole sampler call."""
    pair = handle.pin()
    try:
        with replica.unet_lock:
            return batching.run_group(replica.sampler, pair, jobs, callback=callback)
    finally:
        handle.unpin()


async def short_latency(replica, short: GenerationJob, adapters, maps: GenerationJob | None, whole_call: bool):
    """Seconds from the short request's arrival to its answer (after 2 steps of ``maps``, if given)."""
    steps: list[int] = []
    long_call = None
    if maps is not None:
        sample = whole_call_sample if whole_call else DreamBlendModel.func_or_class._sample
        long_call = asyncio.create_task(asyncio.to_thread(
            sample, replica, LoadedPair(maps.model_id, replica), [maps], lambda step, total: steps.append(step)))
        while len(steps) < 2:
            await asyncio.sleep(0.002)
    start = time.perf_counter()
    output, _, _ = await replica.continuous.submit(short, adapters)
    seconds = time.perf_counter() - start
    if isinstance(output, Exception):
        raise output
    at_end = len(steps)
    if long_call is not None:
        await long_call
    return seconds, at_end


def run(args) -> dict:
    root = tempfile.mkdtemp(prefix="bench-hostage-")
    subjects = make_subjects(args.base, root, 2)
    replica = DreamBlendModel.func_or_class.local(AppArgs(base=args.base, storage_root=root),
                                                  load_components(args.base, device="cpu"))
    short = GenerationJob(subjects[0], ["a photo of sks ball"], [7],
                          SamplingConfig(num_inference_steps=args.short_steps))
    maps = GenerationJob(subjects[1], [f"a photo of sks ball, view {k}" for k in range(args.maps_prompts)],
                         list(range(args.maps_prompts)),
                         SamplingConfig(num_inference_steps=args.maps_steps, attention_maps=True))
    pair = LoadedPair(subjects[0], replica).pin()
    adapters = (pair.guidance_adapter, pair.edit_adapter)
    asyncio.run(short_latency(replica, short, adapters, None, False))  # warm-up
    times = {name: [] for name in VARIANTS}
    maps_steps_at_end = {name: [] for name in VARIANTS[1:]}
    for round_ in range(args.repeats):
        for name in VARIANTS:
            seconds, at_end = asyncio.run(short_latency(replica, short, adapters, None if name == "alone" else maps,
                                                        whole_call=name == VARIANTS[1]))
            times[name].append(seconds)
            if name != "alone":
                maps_steps_at_end[name].append(at_end)
            logger.info("round %d, %s: %.3f s (maps request at step %d of %d)", round_ + 1, name, seconds,
                        at_end, args.maps_steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"base": args.base, "short_steps": args.short_steps, "maps_prompts": args.maps_prompts,
            "maps_steps": args.maps_steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "median_s": {k: round(v, 3) for k, v in medians.items()},
            "maps_step_when_short_answered": maps_steps_at_end,
            "behind_to_alone_step_lock": round(medians[VARIANTS[2]] / medians["alone"], 2),
            "behind_to_alone_whole_call": round(medians[VARIANTS[1]] / medians["alone"], 2)}


def print_table(result: dict) -> None:
    print(f"\nshort request ({result['short_steps']} steps, continuous) vs a heat-map request "
          f"({result['maps_prompts']} prompts x {result['maps_steps']} steps, static), tiny base, CPU, "
          f"{result['repeats']} rounds")
    print(f"{'variant':32} {'median s':>9} {'x alone':>8}")
    for name, seconds in result["median_s"].items():
        print(f"{name:32} {seconds:9.3f} {seconds / result['median_s']['alone']:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--short-steps", type=int, default=5)
    parser.add_argument("--maps-prompts", type=int, default=4)
    parser.add_argument("--maps-steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("dreamblend_ray", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = run(args)
    print_table(result)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

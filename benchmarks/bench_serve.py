"""Throughput and latency of the DreamBlend Serve endpoint: batching, and load beyond a replica's slots.

Starts local Ray and Serve on loopback, fine-tunes one subject on the base model for a few LoRA
steps into a temporary storage root, and deploys the same application several times, each driven
by closed-loop HTTP clients at each concurrency level (one image per request, its own seed):

- ``batched``: the app's defaults (``max_batch_size`` 8, ``max_ongoing_requests`` 64 per replica,
  ``max_queued_requests`` 64), at 1, 4, 16 and 64 clients: waiting requests queue on the replica
  itself, in arrival order, for its next batch.
- ``router-queue``: ``max_ongoing_requests`` 16 (the earlier default), at 16 and 64: at 64, 48
  requests wait in Serve's router for a slot, so this row measures how fast the router refills a
  replica (with the app's ``router_max_backoff_s`` 0.05).
- ``ray-backoff``: ``max_ongoing_requests`` 16 with Ray's default router backoff
  (``router_max_backoff_s`` 0.5), at 16 and 64: the configuration behind issue 16's c=64 drop.
- ``unbatched``: ``max_batch_size`` 1, at 1, 4 and 16.

Prints a table and, last, ``RESULT {json}`` with images/s, p50/p95 latency and mean batch per
(mode, concurrency), the peak RSS of the model replica, and the ratios: c=64 to c=16 throughput
(batched, router-queue and ray-backoff) and batched to unbatched at c=16. Measures; never passes or fails.

    .venv/bin/python benchmarks/bench_serve.py                 # tiny model, 5 DDIM steps
    .venv/bin/python benchmarks/bench_serve.py --steps 10 --modes batched --concurrency 16 64
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import logging
import socket
import statistics
import tempfile
import time

import httpx

MODES = {  # name -> (app args over the common ones, concurrency levels when --concurrency is not given)
    "batched": ({}, [1, 4, 16, 64]),
    "router-queue": ({"max_ongoing_requests": 16}, [16, 64]),
    "ray-backoff": ({"max_ongoing_requests": 16, "router_max_backoff_s": 0.5}, [16, 64]),
    "unbatched": ({"max_batch_size": 1}, [1, 4, 16]),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_subject(base: str, root: str) -> str:
    """A subject fine-tuned 2 LoRA steps (checkpoints 1 and 2): enough for real G/E adapters."""
    from PIL import Image, ImageDraw

    from dreamblend_ray.config import FinetuneConfig
    from dreamblend_ray.training.finetune import finetune_subject

    images = []
    for shift in range(3):
        image = Image.new("RGB", (64, 64), (0, 0, 0))
        ImageDraw.Draw(image).ellipse((12 + shift, 12, 48 + shift, 48), fill=(255, 0, 0))
        images.append(image)
    config = FinetuneConfig(steps=2, learning_rate=5e-2, prior_preservation=False, checkpoint_steps=(1, 2),
                            device="cpu")
    finetune_subject(base, images, "ball", "bench", root, config, progress=False)
    return "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def drive(url: str, body: dict, concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` closed-loop clients; latency and throughput."""
    latencies, batch_sizes, counter = [], [], iter(range(total))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for index in counter:
                start = time.perf_counter()
                response = http.post("/v1/generate", json={**body, "seed": 1000 + index})
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                latencies.append(time.perf_counter() - start)
                batch_sizes.append(int(response.headers["x-dreamblend-batch-size"]))

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        for job in [pool.submit(client) for _ in range(concurrency)]:
            job.result()
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": total, "images_per_s": round(total / wall, 3),
            "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
            "mean_batch": round(statistics.mean(batch_sizes), 2)}


def bench_mode(url: str, name: str, app_args: dict, body: dict, levels: list[int], rounds: int) -> dict:
    from ray import serve

    from dreamblend_ray.serving.app import build_app

    serve.run(build_app(app_args), name="dreamblend", route_prefix="/")
    drive(url, body, 1, 2)  # warm-up: loads the subject's pair, first-call overheads
    rows = []
    for concurrency in levels:
        row = drive(url, body, concurrency, max(4, rounds * concurrency))
        logging.getLogger("bench").info("%s: %s", name, row)
        rows.append(row)
    health = httpx.get(f"{url}/healthz", params={"deep": "true"}, timeout=60).json()["model"]
    return {"max_batch_size": app_args.get("max_batch_size", 8),
            "router_max_backoff_s": app_args.get("router_max_backoff_s", 0.05),
            "levels": rows, "peak_replica_rss_mb": health.get("peak_rss_mb")}


def rate(results: dict, mode: str, concurrency: int) -> float | None:
    rows = results.get(mode, {}).get("levels", [])
    return next((r["images_per_s"] for r in rows if r["concurrency"] == concurrency), None)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 2) if numerator and denominator else None


def print_table(results: dict, base: str, steps: int) -> None:
    print(f"\nDreamBlend Serve, base={base}, {steps} DDIM steps, 1 image/request, one model replica "
          "(app defaults: max_ongoing_requests 64, max_queued_requests 64; modes override them)")
    print(f"{'mode':<12} {'batch':>5} {'backoff':>7} {'conc':>4} {'reqs':>5} {'img/s':>7} {'p50 s':>7} "
          f"{'p95 s':>7} {'mean batch':>10}")
    for mode, result in results.items():
        for row in result["levels"]:
            print(f"{mode:<12} {result['max_batch_size']:>5} {result['router_max_backoff_s']:>7} "
                  f"{row['concurrency']:>4} {row['requests']:>5} {row['images_per_s']:>7.3f} {row['p50_s']:>7.3f} "
                  f"{row['p95_s']:>7.3f} {row['mean_batch']:>10.2f}")
        print(f"{mode:<12} peak replica RSS {result['peak_replica_rss_mb']} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny", help="base model (default tiny)")
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps per request")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="levels for every mode (default: each mode's own, see above)")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.05)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import ray
    import torch
    from ray import serve

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="bench-serve-")
    subject = make_subject(args.base, root)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    body = {"subject_id": subject, "prompt": "a sks ball on the grass", "num_inference_steps": args.steps}
    common = {"base": args.base, "storage_root": root, "num_cpus": 1, "ingress_num_cpus": 0.1,
              "batch_wait_timeout_s": args.batch_wait_timeout_s, "request_timeout_s": 600}
    results = {}
    try:
        for mode in args.modes:
            overrides, levels = MODES[mode]
            results[mode] = bench_mode(url, mode, {**common, **overrides}, body, args.concurrency or levels,
                                       args.rounds)
    finally:
        serve.shutdown()
        ray.shutdown()

    print_table(results, args.base, args.steps)
    ratios = {"batched_64_to_16": ratio(rate(results, "batched", 64), rate(results, "batched", 16)),
              "router_queue_64_to_16": ratio(rate(results, "router-queue", 64), rate(results, "router-queue", 16)),
              "ray_backoff_64_to_16": ratio(rate(results, "ray-backoff", 64), rate(results, "ray-backoff", 16)),
              "batched_to_unbatched_at_16": ratio(rate(results, "batched", 16), rate(results, "unbatched", 16))}
    print("throughput ratios: " + ", ".join(f"{name} {'n/a' if value is None else f'{value}x'}"
                                            for name, value in ratios.items()))
    print("RESULT " + json.dumps({"base": args.base, "steps": args.steps, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()

"""Throughput and latency of the DreamBlend Serve endpoint, with and without request batching.

Starts local Ray and Serve on loopback, fine-tunes one subject on the base model for a few LoRA
steps into a temporary storage root, deploys the same application twice (``max_batch_size`` N,
then 1) and drives it with closed-loop HTTP clients at each concurrency level (default 1, 4, 16).
Each request asks for one image with its own seed. Prints a table and, last, ``RESULT {json}``
with images/s and p50/p95 latency per (mode, concurrency), the peak RSS of the model replica, and
the batched/unbatched throughput ratio at the highest concurrency. Measures; never passes or fails.

    .venv/bin/python benchmarks/bench_serve.py                 # tiny model, 10 DDIM steps
    .venv/bin/python benchmarks/bench_serve.py --steps 20 --concurrency 1 8 32
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_subject(base: str, root: str) -> str:
    """A subject fine-tuned 2 LoRA steps (checkpoints 1 and 2): enough for real G/E adapters."""
    from PIL import Image, ImageDraw

    from dreamblend_ray.config import FinetuneConfig
    from dreamblend_ray.finetune import finetune_subject

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


def bench_mode(url: str, app_args: dict, body: dict, levels: list[int], rounds: int) -> tuple[list, dict]:
    from ray import serve

    from dreamblend_ray.serve_app import build_app

    serve.run(build_app(app_args), name="dreamblend", route_prefix="/")
    drive(url, body, 1, 2)  # warm-up: loads the subject's pair, first-call overheads
    rows = []
    for concurrency in levels:
        row = drive(url, body, concurrency, max(4, rounds * concurrency))
        logging.getLogger("bench").info("batch %s: %s", app_args["max_batch_size"], row)
        rows.append(row)
    health = httpx.get(f"{url}/healthz", params={"deep": "true"}, timeout=60).json()["model"]
    return rows, health


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny", help="base model (default tiny)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-batch-size", type=int, default=16)
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
              "max_queued_requests": -1, "max_ongoing_requests": max(16, args.max_batch_size, *args.concurrency),
              "batch_wait_timeout_s": args.batch_wait_timeout_s, "request_timeout_s": 600}
    results = {}
    try:
        for mode, size in (("batched", args.max_batch_size), ("unbatched", 1)):
            rows, health = bench_mode(url, {**common, "max_batch_size": size}, body, args.concurrency, args.rounds)
            results[mode] = {"max_batch_size": size, "levels": rows, "peak_replica_rss_mb": health["peak_rss_mb"]}
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nDreamBlend Serve, base={args.base}, {args.steps} DDIM steps, 1 image/request, "
          f"torch threads per replica: default")
    print(f"{'mode':<10} {'conc':>4} {'reqs':>5} {'img/s':>7} {'p50 s':>7} {'p95 s':>7} {'batch':>6}")
    for mode, result in results.items():
        for row in result["levels"]:
            print(f"{mode:<10} {row['concurrency']:>4} {row['requests']:>5} {row['images_per_s']:>7.3f} "
                  f"{row['p50_s']:>7.3f} {row['p95_s']:>7.3f} {row['mean_batch']:>6.2f}")
        print(f"{mode:<10} peak replica RSS {result['peak_replica_rss_mb']} MiB")
    top = max(args.concurrency)
    rate = {mode: next(r["images_per_s"] for r in res["levels"] if r["concurrency"] == top)
            for mode, res in results.items()}
    ratio = round(rate["batched"] / rate["unbatched"], 2)
    print(f"batched/unbatched throughput at concurrency {top}: {ratio}x")
    print("RESULT " + json.dumps({"base": args.base, "steps": args.steps, "results": results,
                                  f"ratio_batched_unbatched_at_{top}": ratio}))


if __name__ == "__main__":
    main()

"""The subject service, measured (issue 28): create -> ready time, the ingress's memory while it
receives the largest allowed upload, and serving throughput on other subjects while trainings run.

    python benchmarks/bench_lifecycle.py                 # defaults: ~6 minutes on 2 cores
    python benchmarks/bench_lifecycle.py --toy           # seconds-sized, what the test runs

Three parts, one process (plus the servers it starts):

1. upload: the real ingress app (``serving.http.make_api`` with the real scheduler, trainings not
   started) under uvicorn in a child process; the largest allowed upload (``--upload-mb`` in files of
   at most ``--file-mb``, noise PNGs that barely compress) is POSTed; the child's peak RSS (VmHWM)
   before and after, against the upload's size.
2. create -> ready: a local Ray + Serve app on the tiny base; ``--subjects`` LoRA subjects of
   ``--train-steps`` steps created one after another over HTTP and polled until ready; wall time,
   and how much of it the training itself took (the manifest's train_s).
3. serving while training: a closed loop of ``--clients`` clients generating on two ready subjects
   for ``--seconds``: alone (on all cores, and on all cores but one); with two trainings running on
   the same cores; with two trainings pinned to a core of their own and the replica to the rest
   (``os.sched_setaffinity``: what a separate training worker group gives a cluster). The fair
   comparison for "training on its own resources" is own core against alone on the same cores.

The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

logger = logging.getLogger("bench_lifecycle")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def noise_png(side: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def ball_png(color, shift=0) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(image).ellipse((12 + shift, 12, 48 + shift, 48), fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


# --------------------------------------------------------------------------- part 1: the upload


def serve_ingress(port: int, root: str, limits: dict) -> None:
    """Child process: the real ingress app, its scheduler in process, trainings never started."""
    import uvicorn

    from dreamblend_ray.lifecycle.scheduler import SubjectScheduler
    from dreamblend_ray.serving import http
    from dreamblend_ray.serving.requests import AppArgs

    class NoTraining(SubjectScheduler):
        def _launch_training(self, subject_id):
            return None

        async def _reap_trainings(self):
            return None

        async def start(self):
            return True

    args = AppArgs(base="tiny", storage_root=root, **limits)
    service = NoTraining({"storage_root": root})
    api = http.make_api(args, backend=None, read_manifest=lambda s: (_ for _ in ()).throw(FileNotFoundError(s)),
                        list_subjects=lambda a, n: [], read_collapse_plot=lambda s: b"", subject_service=service)
    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning")


def measure_upload(upload_mb: float, file_mb: float) -> dict:
    import httpx

    side = int((file_mb * 2**20 / 3) ** 0.5) - 8  # a noise PNG is about 3 bytes a pixel
    files = []
    while sum(len(f) for f in files) + 3 * side * side < upload_mb * 2**20:
        files.append(noise_png(side, len(files)))
    total = sum(len(f) for f in files)
    limits = {"upload_max_files": max(20, len(files)), "upload_max_file_bytes": max(len(f) for f in files),
              "upload_max_total_bytes": total, "upload_max_pixels": side * side, "upload_min_side": 32}
    port = free_port()
    child = multiprocessing.get_context("spawn").Process(
        target=serve_ingress, args=(port, tempfile.mkdtemp(prefix="bench-upload-"), limits), daemon=True)
    child.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.get("/healthz")
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    before = peak_rss_mib(child.pid)
    start = time.perf_counter()
    response = client.post("/v1/subjects", data={"class_noun": "noise"},
                           files=[("images", (f"n{i}.png", data, "image/png")) for i, data in enumerate(files)])
    seconds = time.perf_counter() - start
    after = peak_rss_mib(child.pid)
    child.terminate()
    child.join(10)
    if response.status_code != 202:
        raise RuntimeError(f"the upload was refused: {response.status_code} {response.text[:300]}")
    return {"upload_mib": total / 2**20, "files": len(files), "largest_file_mib": max(map(len, files)) / 2**20,
            "rss_before_mib": before, "rss_peak_mib": after, "rss_growth_mib": after - before,
            "growth_over_upload": (after - before) / (total / 2**20), "seconds": seconds}


# --------------------------------------------------------------------------- parts 2 and 3: Ray + Serve


def start_service(train_steps: int):
    import httpx
    import ray
    from ray import serve

    from dreamblend_ray.serving.app import build_app

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    root = tempfile.mkdtemp(prefix="bench-lifecycle-")
    port = free_port()
    args = {"base": "tiny", "storage_root": root, "default_steps": 10, "num_cpus": 0.1, "ingress_num_cpus": 0.1,
            "manifest_cache_s": 0, "upload_min_side": 32, "max_concurrent_trainings": 2, "training_num_cpus": 0.5,
            "max_train_steps": 100_000,
            "finetune_defaults": {"prior_preservation": False, "resolution": 32, "min_image_size": 32,
                                  "learning_rate": 5e-2, "steps": train_steps}}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="dreamblend", route_prefix="/")
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300), root


def create(client, subject_id: str, steps: int, color=(255, 0, 0)) -> None:
    files = [("images", (f"b{i}.png", ball_png(color, i), "image/png")) for i in range(3)]
    response = client.post("/v1/subjects", files=files,
                           data={"class_noun": "ball", "subject_id": subject_id, "steps": str(steps)})
    if response.status_code != 202:
        raise RuntimeError(f"create {subject_id}: {response.status_code} {response.text[:300]}")


def wait_ready(client, subject_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/subjects/{subject_id}").json()
        if body["status"] in ("ready", "failed", "canceled"):
            if body["status"] != "ready":
                raise RuntimeError(f"{subject_id} ended {body['status']}: {body.get('error')}")
            return body
        time.sleep(0.05)
    raise RuntimeError(f"{subject_id} not ready after {timeout}s")


def measure_create_to_ready(client, root: str, count: int, steps: int) -> dict:
    from dreamblend_ray.io import storage

    walls, trains = [], []
    for n in range(count):
        start = time.perf_counter()
        create(client, f"ready-{n}", steps)
        wait_ready(client, f"ready-{n}")
        walls.append(time.perf_counter() - start)
        manifest = storage.read_json(storage.join(root, "subjects", f"ready-{n}", "subject.json"))
        trains.append(manifest["timings"]["train_s"])
    return {"steps": steps, "create_to_ready_s": walls, "median_s": statistics.median(walls),
            "train_s_median": statistics.median(trains),
            "overhead_s_median": statistics.median(w - t for w, t in zip(walls, trains))}


def closed_loop(client, subjects: list[str], clients: int, seconds: float) -> float:
    """Images/s of ``clients`` threads generating one image at a time on ``subjects`` in turn."""
    done, stop = [0], time.monotonic() + seconds

    def worker(k: int) -> None:
        n = k
        while time.monotonic() < stop:
            body = {"subject_id": subjects[n % len(subjects)], "prompt": "a sks ball", "seed": n}
            if client.post("/v1/generate", json=body).status_code == 200:
                done[0] += 1
            n += clients

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.monotonic() - start)


def replica_pids() -> list[int]:
    from ray import serve

    return [serve.get_deployment_handle("DreamBlendModel", "dreamblend").process_id.remote().result()]


def pin(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        try:
            os.sched_setaffinity(pid, cpus)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def training_pids(root: str, subject_ids: list[str]) -> list[int]:
    from dreamblend_ray.io import storage

    pids = []
    for subject_id in subject_ids:
        try:
            pids.append(storage.read_json(storage.join(root, "subjects", subject_id, "progress.json"))["worker_pid"])
        except (FileNotFoundError, KeyError, ValueError):
            pass
    return pids


def measure_serving_while_training(client, root: str, clients: int, seconds: float, train_steps: int) -> dict:
    ready = ["ready-0", "ready-1"]
    cpus = sorted(os.sched_getaffinity(0))
    replica = replica_pids()
    pin(replica, set(cpus))
    alone = closed_loop(client, ready, clients, seconds)
    results = {"alone": alone}
    if len(cpus) > 1:  # the replica on the cores it keeps when the trainings get their own
        pin(replica, set(cpus[:-1]))
        results["alone_same_cores"] = closed_loop(client, ready, clients, seconds)
        pin(replica, set(cpus))
    for mode in ("shared_cores", "own_core"):
        trainers = [f"{mode}-{k}" for k in range(2)]
        for k, subject_id in enumerate(trainers):
            create(client, subject_id, train_steps, color=(0, 255 * k, 255))
        deadline = time.monotonic() + 120
        while len(training_pids(root, trainers)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        if mode == "own_core" and len(cpus) > 1:
            pin(training_pids(root, trainers), {cpus[-1]})  # the trainings' own core ...
            pin(replica, set(cpus[:-1]))  # ... and the replica's
        results[mode] = closed_loop(client, ready, clients, seconds)
        still = [s for s in trainers if client.get(f"/v1/subjects/{s}").json()["status"] == "training"]
        results[f"{mode}_trainings_ran_throughout"] = len(still) == 2
        for subject_id in trainers:
            client.delete(f"/v1/subjects/{subject_id}")
        pin(replica, set(cpus))
    same = results.get("alone_same_cores", alone)
    return {**results, "clients": clients, "seconds": seconds, "replica_pinned": bool(replica),
            "shared_over_alone": results["shared_cores"] / alone, "own_core_over_alone": results["own_core"] / alone,
            "own_core_over_alone_same_cores": results["own_core"] / same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="seconds-sized run (the test)")
    parser.add_argument("--upload-mb", type=float, default=50.0, help="the largest allowed upload (MiB)")
    parser.add_argument("--file-mb", type=float, default=10.0, help="the largest allowed file (MiB)")
    parser.add_argument("--subjects", type=int, default=3, help="create -> ready runs")
    parser.add_argument("--train-steps", type=int, default=100, help="LoRA steps of each create -> ready run")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="each closed-loop measurement")
    args = parser.parse_args()
    if args.toy:
        args.upload_mb, args.file_mb, args.subjects, args.train_steps, args.seconds = 2.0, 1.0, 2, 4, 3.0
    logging.basicConfig(level=logging.WARNING)

    upload = measure_upload(args.upload_mb, args.file_mb)
    client, root = start_service(args.train_steps)
    ready = measure_create_to_ready(client, root, args.subjects, args.train_steps)
    serving = measure_serving_while_training(client, root, args.clients, args.seconds,
                                             train_steps=100_000 if not args.toy else 400)
    print(f"\nupload: {upload['files']} files, {upload['upload_mib']:.1f} MiB -> ingress peak RSS "
          f"{upload['rss_before_mib']:.0f} -> {upload['rss_peak_mib']:.0f} MiB "
          f"(+{upload['rss_growth_mib']:.1f} MiB, {upload['growth_over_upload']:.2f}x the upload) "
          f"in {upload['seconds']:.1f} s")
    print(f"create -> ready ({ready['steps']} LoRA steps, tiny base): median {ready['median_s']:.2f} s "
          f"(training {ready['train_s_median']:.2f} s, the rest {ready['overhead_s_median']:.2f} s); "
          f"runs {', '.join(f'{s:.2f}' for s in ready['create_to_ready_s'])}")
    print("\n| serving on 2 ready subjects | images/s | vs alone |\n|---|---|---|")
    for name in ("alone", "alone_same_cores", "shared_cores", "own_core"):
        if name in serving:
            print(f"| {name.replace('_', ' ')} | {serving[name]:.2f} | {serving[name] / serving['alone']:.2f}x |")
    print(f"own core against alone on the same cores: {serving['own_core_over_alone_same_cores']:.2f}x")
    client.close()
    from ray import serve
    import ray

    serve.shutdown()
    ray.shutdown()
    print("RESULT " + json.dumps({"upload": upload, "create_to_ready": ready, "serving_while_training": serving}))


if __name__ == "__main__":
    sys.exit(main())

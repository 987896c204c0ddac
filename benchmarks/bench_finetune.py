"""Fine-tuning throughput and peak memory on the tiny model, ours vs diffusers' DreamBooth step.

Variants: LoRA and full UNet fine-tuning, each with and without prior preservation, at batch 1
(one instance image per step, plus one class image with prior preservation), 32x32.

Steps/s: wall-clock (1 / the median step) and per CPU-second of this process (steady on a
shared machine; equal to wall-clock on an idle one with one thread). Ours and the reference alternate
for ``--rounds`` rounds and each side reports its best round, which evens out other processes'
load on a shared machine. Peak memory is the largest over rounds.

"ours" runs ``dreamblend_ray.training.finetune.finetune_subject`` end to end (checkpoint only at the last
step) and times the steps between ``--warmup`` and the last through its step callback.
"reference" reproduces, in this process, the inner training step of diffusers'
``examples/dreambooth/train_dreambooth_lora.py`` (``train_dreambooth.py`` for full fine-tuning):
an ``accelerate.Accelerator``, the VAE encode and text-encoder forward every step,
``noise_scheduler.add_noise``, the UNet forward, ``F.mse_loss`` (+ prior loss), backward,
gradient clipping and an AdamW step, with the same settings. Its data loading is excluded.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size
above the value at the start of the variant, sampled every 2 ms (tracemalloc does not see
torch's allocations; ru_maxrss only ever grows over a process), after ``malloc_trim`` hands
freed heap memory back to the OS. The models' own weights are in the baseline for LoRA; full
fine-tuning counts its UNet copy, gradients and AdamW state.

Prints a table and, last, ``RESULT {json}``. Timings only; it never passes or fails on them.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreamblend_ray.models.components import build_tiny_components
from dreamblend_ray.config import FinetuneConfig
from dreamblend_ray.training.finetune import finetune_subject, to_tensor

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class PeakMemory:
    """Peak memory of a block in MiB (CUDA allocator, or sampled RSS growth on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self.rss())

    @staticmethod
    def release_free_memory():
        """Return freed heap memory to the OS so that RSS growth measures new allocations."""
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def __enter__(self):
        self.release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, self.rss()) - self._base) / 2**20


def make_images(n: int = 3) -> list[Image.Image]:
    images = []
    for i in range(n):
        a = np.full((32, 32, 3), 20, np.uint8)
        a[8:24, 8:24] = (200, 40 + 30 * i, 40)
        images.append(Image.fromarray(a))
    return images


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rates(stamps: dict[int, tuple[float, float]], first: int, last: int) -> dict:
    """Steps/s over steps ``first+1 .. last`` from per-step (wall, process CPU) end times:
    wall-clock (1 / median step: robust to bursts of other processes), and CPU time (steps per
    CPU-second of this process: what the step costs, whatever else the machine runs)."""
    wall = np.diff([stamps[s][0] for s in range(first, last + 1)])
    cpu = stamps[last][1] - stamps[first][1]
    return {"steps_per_s": 1.0 / float(np.median(wall)), "cpu_steps_per_s": len(wall) / max(cpu, 1e-9)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- ours

def run_ours(components, images, method: str, prior: bool, steps: int, warmup: int, root: str) -> dict:
    config = FinetuneConfig(method=method, steps=steps, learning_rate=1e-4, batch_size=1,
                            prior_preservation=prior, num_class_images=4, class_sampling_steps=2,
                            checkpoint_steps=(steps,))
    stamps = {}

    def stamp(step, loss):
        sync(components.device)
        stamps[step] = now()

    with PeakMemory(components.device) as mem:
        finetune_subject(components, images, "dog", f"bench-{method}-{int(prior)}", root, config,
                         progress=False, callback=stamp)
    return {**rates(stamps, warmup, steps - 1), "peak_mb": mem.peak_mb}  # the last step saves: untimed


# --------------------------------------------------------------------------- reference

def reference_batches(components, images, class_images, prior: bool, steps: int):
    """Collated batches as DreamBoothDataset + collate_fn give them (pixels, input_ids)."""
    tok = components.tokenizer

    def ids(prompt):
        return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    inst = [to_tensor(im, 32) for im in images]
    cls = [to_tensor(im, 32) for im in class_images]
    batches = []
    for i in range(steps):
        pixels, input_ids = [inst[i % len(inst)]], [ids("a photo of sks dog")]
        if prior:
            pixels.append(cls[i % len(cls)])
            input_ids.append(ids("a photo of dog"))
        batches.append({"pixel_values": torch.stack(pixels).to(components.device),
                        "input_ids": torch.cat(input_ids).to(components.device)})
    return batches


def run_reference(components, batches, method: str, prior: bool, steps: int, warmup: int) -> dict:
    """The inner loop of train_dreambooth_lora.py (train_dreambooth.py for method="full")."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
    vae, text_encoder = components.vae, components.text_encoder
    with PeakMemory(components.device) as mem:
        unet = copy.deepcopy(components.unet)
        if method == "lora":
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS))
        else:
            unet.requires_grad_(True)
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        unet.train()
        stamps = {}
        for step, batch in enumerate(batches[:steps], start=1):
            with accelerator.accumulate(unet):
                pixel_values = batch["pixel_values"].to(dtype=torch.float32)
                model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=model_input.device).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"])[0]
                model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
                target = noise
                if prior:
                    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                    target, target_prior = torch.chunk(target, 2, dim=0)
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                    prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
                    loss = loss + 1.0 * prior_loss
                else:
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss.detach().item()  # the script logs the loss every step
            sync(components.device)
            stamps[step] = now()
        del unet, optimizer
    accelerator.free_memory()
    return {**rates(stamps, warmup, steps - 1), "peak_mb": mem.peak_mb}


# --------------------------------------------------------------------------- main

def best(a: dict, b: dict) -> dict:
    """Each side's best round: the higher throughput; the larger (more conservative) memory."""
    return {"steps_per_s": max(a["steps_per_s"], b["steps_per_s"]),
            "cpu_steps_per_s": max(a["cpu_steps_per_s"], b["cpu_steps_per_s"]),
            "peak_mb": max(a["peak_mb"], b["peak_mb"])}


def measure(components, images, args, root: str) -> dict:
    from dreamblend_ray.training.finetune import class_images

    prior_images = class_images(components, "dog", root, 32, FinetuneConfig(
        num_class_images=4, class_sampling_steps=2))  # cached for ours, reused by the reference
    rows: dict[str, dict] = {}
    for _ in range(args.rounds):
        for method in ("lora", "full"):
            for prior in (False, True):
                name = f"{method}{'+prior' if prior else ''}"
                batches = reference_batches(components, images, prior_images, prior, args.steps)
                ours = run_ours(components, images, method, prior, args.steps, args.warmup, root)
                ref = run_reference(components, batches, method, prior, args.steps, args.warmup)
                row = rows.setdefault(name, {"ours": ours, "reference": ref})
                row["ours"], row["reference"] = best(row["ours"], ours), best(row["reference"], ref)
    for row in rows.values():
        for key in ("steps_per_s", "cpu_steps_per_s", "peak_mb"):
            ref = row["reference"][key]
            row[f"{key}_ratio"] = row["ours"][key] / ref if ref > 0 else None
    return rows


def report(rows: dict, args, device: torch.device) -> None:
    timed = args.steps - 1 - args.warmup
    print(f"tiny model, batch 1, 32x32, {device}, {args.threads} thread(s), {timed} timed steps per "
          f"variant, best of {args.rounds} rounds; x = ours / reference")
    print(f"{'':<12}{'wall steps/s':^26}{'CPU-time steps/s':^26}{'peak MiB':^20}")
    print(f"{'variant':<12}" + f"{'ours':>8}{'ref':>8}{'x':>8}  " * 2 + f"{'ours':>8}{'ref':>8}")
    for name, row in rows.items():
        cells = "".join(f"{row['ours'][k]:>8.1f}{row['reference'][k]:>8.1f}{row[k + '_ratio']:>8.2f}  "
                        for k in ("steps_per_s", "cpu_steps_per_s"))
        print(f"{name:<12}{cells}{row['ours']['peak_mb']:>8.1f}{row['reference']['peak_mb']:>8.1f}")
    result = {"device": str(device), "threads": args.threads, "timed_steps": timed,
              "rounds": args.rounds, "variants": rows}
    print("RESULT " + json.dumps(result, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per variant (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the tiny model gains nothing from more, "
                             "and a shared machine is steadier)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate ours/reference this many times; report each side's best round")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.steps < args.warmup + 3:
        parser.error("--steps must exceed --warmup by at least 3")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    components = build_tiny_components(seed=0).to(device)
    with tempfile.TemporaryDirectory() as root:
        rows = measure(components, make_images(), args, root)
    report(rows, args, device)


if __name__ == "__main__":
    main()

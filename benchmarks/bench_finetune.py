"""Fine-tuning throughput and peak memory on a tiny model, ours vs diffusers' DreamBooth step.

Variants: LoRA and full UNet fine-tuning, each with and without prior preservation, at batch 1
(one instance image per step, plus one class image with prior preservation), at the model's
default size (32x32 for every built-in tiny model). ``--base`` picks the family: ``tiny`` (SD 1.x,
the default), ``tiny-sd2`` (SD 2.x, v-prediction) or ``tiny-sdxl`` (SDXL).

Steps/s: wall-clock (1 / the median step) and per CPU-second of this process (steady on a
shared machine; equal to wall-clock on an idle one with one thread). Ours and the reference alternate
for ``--rounds`` rounds and each side reports its best round, which evens out other processes'
load on a shared machine. Peak memory is the largest over rounds.

"ours" runs ``dreamblend_ray.training.finetune.finetune_subject`` end to end (checkpoint only at the last
step) and times the steps between ``--warmup`` and the last through its step callback.
"reference" reproduces, in this process, the inner training step of diffusers'
``examples/dreambooth/train_dreambooth_lora.py`` (``train_dreambooth.py`` for full fine-tuning):
an ``accelerate.Accelerator``, the VAE encode and text-encoder forward every step,
``noise_scheduler.add_noise``, the UNet forward, ``F.mse_loss`` against the noise (the velocity on
v-prediction models) (+ prior loss), backward, gradient clipping and an AdamW step, with the same
settings. Its data loading is excluded.
On SDXL the reference is the step of ``examples/dreambooth/train_dreambooth_lora_sdxl.py``: the
instance (and class) prompt encoded once before training by both text encoders (penultimate
hidden states concatenated, the second encoder's pooled output), then per step the VAE encode,
``add_noise``, time ids ``original size + crop top-left + target size`` per image, the UNet forward
with ``added_cond_kwargs={"time_ids", "text_embeds"}``, the loss, backward, clipping, AdamW.
diffusers has no full (non-LoRA) DreamBooth script for SDXL: the "full" rows there run that same
step with every UNet weight trainable, as ``train_dreambooth.py`` does for SD.

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

from dreamblend_ray.models import families
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


def make_images(n: int = 3, size: int = 32) -> list[Image.Image]:
    images = []
    for i in range(n):
        a = np.full((size, size, 3), 20, np.uint8)
        a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 40 + 30 * i, 40)
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

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"


def tokenize_prompt(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def reference_batches(components, images, class_images, prior: bool, steps: int):
    """Collated batches as DreamBoothDataset + collate_fn give them: pixels, input_ids (SD) and
    the original sizes and crop corners (SDXL; the images are already square at the resolution)."""
    size = components.default_size
    inst = [to_tensor(im, size) for im in images]
    cls = [to_tensor(im, size) for im in class_images]
    batches = []
    for i in range(steps):
        pixels, input_ids = [inst[i % len(inst)]], [tokenize_prompt(components.tokenizer, INSTANCE_PROMPT)]
        if prior:
            pixels.append(cls[i % len(cls)])
            input_ids.append(tokenize_prompt(components.tokenizer, CLASS_PROMPT))
        batches.append({"pixel_values": torch.stack(pixels).to(components.device),
                        "input_ids": torch.cat(input_ids).to(components.device),
                        "original_sizes": [(size, size)] * len(pixels), "crop_top_lefts": [(0, 0)] * len(pixels)})
    return batches


@torch.no_grad()
def sdxl_encode_prompt(text_encoders, tokenizers, prompt):
    """train_dreambooth_lora_sdxl.py's encode_prompt: penultimate hidden states of both encoders,
    concatenated; the pooled output of the last."""
    embeds = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        out = text_encoder(tokenize_prompt(tokenizer, prompt).to(text_encoder.device), output_hidden_states=True,
                           return_dict=False)
        pooled, hidden = out[0], out[-1][-2]
        embeds.append(hidden.view(hidden.shape[0], hidden.shape[1], -1))
    return torch.concat(embeds, dim=-1), pooled.view(pooled.shape[0], -1)


def sdxl_conditioning(components, prior: bool):
    """The script's static text conditioning: instance (+ class) prompt embeddings, computed once."""
    encoders = [components.text_encoder, components.text_encoder_2]
    tokenizers = [components.tokenizer, components.tokenizer_2]
    prompt_embeds, pooled = sdxl_encode_prompt(encoders, tokenizers, INSTANCE_PROMPT)
    if prior:
        class_embeds, class_pooled = sdxl_encode_prompt(encoders, tokenizers, CLASS_PROMPT)
        prompt_embeds, pooled = torch.cat([prompt_embeds, class_embeds]), torch.cat([pooled, class_pooled])
    return prompt_embeds, pooled


def run_reference(components, batches, method: str, prior: bool, steps: int, warmup: int) -> dict:
    """The inner loop of train_dreambooth_lora.py (train_dreambooth.py for method="full"), or of
    train_dreambooth_lora_sdxl.py on an SDXL model."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
    vae, text_encoder = components.vae, components.text_encoder
    sdxl = components.family == "sdxl"
    resolution = components.default_size
    if sdxl:  # encoded once, before the loop (the text encoders are not trained)
        prompt_embeds, unet_add_text_embeds = sdxl_conditioning(components, prior)

    def compute_time_ids(original_size, crops_coords_top_left):
        add_time_ids = list(original_size + crops_coords_top_left + (resolution, resolution))
        return torch.tensor([add_time_ids]).to(accelerator.device, dtype=torch.float32)
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
                if sdxl:
                    add_time_ids = torch.cat([compute_time_ids(s, c) for s, c in
                                              zip(batch["original_sizes"], batch["crop_top_lefts"])])
                    elems_to_repeat_text_embeds = bsz // 2 if prior else bsz
                    unet_added_conditions = {"time_ids": add_time_ids,
                                             "text_embeds": unet_add_text_embeds.repeat(elems_to_repeat_text_embeds, 1)}
                    prompt_embeds_input = prompt_embeds.repeat(elems_to_repeat_text_embeds, 1, 1)
                    model_pred = unet(noisy_model_input, timesteps, prompt_embeds_input,
                                      added_cond_kwargs=unet_added_conditions, return_dict=False)[0]
                else:
                    encoder_hidden_states = text_encoder(batch["input_ids"])[0]
                    model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                else:
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

    prior_images = class_images(components, "dog", root, components.default_size, FinetuneConfig(
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


REFERENCES = {"sd": {"lora": "train_dreambooth_lora.py", "full": "train_dreambooth.py"},
              "sdxl": {"lora": "train_dreambooth_lora_sdxl.py",
                       "full": "train_dreambooth_lora_sdxl.py step, every UNet weight trainable"}}


def report(rows: dict, args, device: torch.device, components) -> None:
    timed = args.steps - 1 - args.warmup
    size = components.default_size
    print(f"{args.base} ({components.family}), batch 1, {size}x{size}, {device}, {args.threads} thread(s), "
          f"{timed} timed steps per variant, best of {args.rounds} rounds; x = ours / reference "
          f"(load average {os.getloadavg()[0]:.2f})")
    print(f"{'':<12}{'wall steps/s':^26}{'CPU-time steps/s':^26}{'peak MiB':^20}")
    print(f"{'variant':<12}" + f"{'ours':>8}{'ref':>8}{'x':>8}  " * 2 + f"{'ours':>8}{'ref':>8}")
    for name, row in rows.items():
        cells = "".join(f"{row['ours'][k]:>8.1f}{row['reference'][k]:>8.1f}{row[k + '_ratio']:>8.2f}  "
                        for k in ("steps_per_s", "cpu_steps_per_s"))
        print(f"{name:<12}{cells}{row['ours']['peak_mb']:>8.1f}{row['reference']['peak_mb']:>8.1f}")
    result = {"base": args.base, "family": components.family, "size": size, "device": str(device),
              "threads": args.threads, "timed_steps": timed, "rounds": args.rounds,
              "reference": REFERENCES[components.family], "load_average": os.getloadavg()[0],
              "variants": rows}
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
    parser.add_argument("--base", default="tiny", choices=sorted(families.BUILTINS),
                        help="the built-in tiny model: its family picks the reference script (default tiny)")
    args = parser.parse_args()
    if args.steps < args.warmup + 3:
        parser.error("--steps must exceed --warmup by at least 3")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    components = build_tiny_components(seed=0, name=args.base).to(device)
    with tempfile.TemporaryDirectory() as root:
        rows = measure(components, make_images(size=components.default_size), args, root)
    report(rows, args, device, components)


if __name__ == "__main__":
    main()

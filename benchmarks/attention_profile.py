"""Where a model's cross-attention goes: the diagnostic behind DreamBlend's reach on a model.

DreamBlend steers E's cross-attention maps toward G's, so it can only restore what a model routes
through those maps. For one prompt this samples a few seeds with the base model (or a subject's
checkpoint) and reports, per cross-attention layer at a few denoising steps:

* the mean entropy of the attention over the prompt's token slots (log T is uniform attention);
* per prompt token, the mean attention inside the object and outside it (in the background),
  with the object found on the final image by the analytic metrics and pooled to the layer's
  resolution. A token whose attribute lives in the maps gets clearly more attention where that
  attribute is drawn (the object's shape word inside the object, say).

The last line is ``RESULT {json}`` with the per-token inside/outside ratio averaged over layers
and steps, and the mean entropy as a fraction of log T.

    python benchmarks/attention_profile.py [--prompt "a red circle on a blue background"]
        [--subject-root DIR --subject striped-star --step 800]
"""

from __future__ import annotations

import argparse
import json
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from dreamblend_ray.training import checkpoints
from dreamblend_ray.method.attention import Recorder, cross_attention_layers, recording
from dreamblend_ray.models.components import load_components
from dreamblend_ray.embedded import metrics
from dreamblend_ray.method.guidance import cfg_combine
from dreamblend_ray.method.sampler import decode_latents, initial_latents, prompt_conditioning

logger = logging.getLogger("attention_profile")


def sample_with_maps(components, unet, prompt: str, seeds: list[int], steps: int, scale: float,
                     keep: set[int]):
    """Plain DDIM+CFG sampling that keeps the cond branch's maps at the steps in ``keep``."""
    cond = prompt_conditioning(components, [prompt] * len(seeds), None, True)
    scheduler = DDIMScheduler.from_config(components.scheduler.config)
    scheduler.set_timesteps(steps)
    size = components.default_size // components.vae_scale_factor
    z = initial_latents(seeds, (1, unet.config.in_channels, size, size), components.device, unet.dtype)
    recorder, kept = Recorder(), {}
    with recording(unet, cross_attention_layers(unet), recorder), torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            with recorder.capture(rows=cond.cond_rows) as store:
                noise = unet(torch.cat([z] * 2), t, encoder_hidden_states=cond.embeds).sample
            if i in keep:
                kept[i] = {name: maps.float().cpu() for name, maps in store.maps.items()}
            z = scheduler.step(cfg_combine(noise, scale), t, z).prev_sample
    images = decode_latents(components, z).permute(0, 2, 3, 1).cpu().numpy() * 255
    return images, kept, cond.input_ids[0]


def profile(images, kept: dict, tokens: list[str]) -> list[dict]:
    masks = [torch.from_numpy(metrics.object_mask(a).astype(np.float32))[None, None] for a in images]
    rows = []
    for step, layers in kept.items():
        for name, maps in layers.items():  # (B, P, T)
            res = int(math.isqrt(maps.shape[1]))
            inside, outside = [], []
            for b, mask in enumerate(masks):
                pooled = F.adaptive_avg_pool2d(mask, res).flatten() > 0.5
                if pooled.any() and (~pooled).any():
                    inside.append(maps[b][pooled].mean(0))
                    outside.append(maps[b][~pooled].mean(0))
            if not inside:
                continue
            entropy = float(-(maps * (maps + 1e-12).log()).sum(-1).mean())
            rows.append({"step": step, "layer": name.split(".transformer_blocks")[0], "resolution": res,
                         "entropy_fraction": entropy / math.log(maps.shape[-1]),
                         "inside": torch.stack(inside).mean(0)[:len(tokens)].tolist(),
                         "outside": torch.stack(outside).mean(0)[:len(tokens)].tolist()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--subject-root", default=None, help="storage root of a fine-tuned subject")
    parser.add_argument("--subject", default=None)
    parser.add_argument("--step", type=int, default=None, help="the subject's checkpoint step")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    components = load_components(args.base)
    unet, pair = components.unet, None
    if args.subject_root:
        pair, _ = checkpoints.load_pair(args.subject_root, args.subject, components, args.step, args.step)
        unet = pair.unets[0]
    keep = {round(args.steps * f) for f in (0.1, 0.33, 0.66)}
    images, kept, ids = sample_with_maps(components, unet, args.prompt, list(range(args.seeds)),
                                         args.steps, args.guidance_scale, keep)
    tokens = [t.replace("</w>", "") for t in components.tokenizer.convert_ids_to_tokens(ids.tolist())]
    tokens = tokens[:tokens.index("<|endoftext|>") + 1]
    rows = profile(images, kept, tokens)
    if not rows:
        raise SystemExit("no image has both an object and a background to compare: use more --steps or --seeds")
    print(f"prompt: {args.prompt!r}  model: {args.base}"  # noqa: T201 - a benchmark prints its table
          + (f" + {args.subject} step {args.step}" if pair else ""))
    print("attention inside / outside the object, per token (uniform = 1/T = "  # noqa: T201
          f"{1 / kept[min(kept)][next(iter(kept[min(kept)]))].shape[-1]:.3f})")
    for row in rows:
        cells = " ".join(f"{t}:{a:.2f}/{b:.2f}" for t, a, b in zip(tokens, row["inside"], row["outside"]))
        print(f"step {row['step']:2d} {row['layer']:28s} r{row['resolution']} "  # noqa: T201
              f"H/logT {row['entropy_fraction']:.2f}  {cells}")
    keys = [f"{i}:{t}" for i, t in enumerate(tokens)]  # prompts repeat words ("a")
    ratio = {k: float(np.mean([r["inside"][i] / max(r["outside"][i], 1e-9) for r in rows]))
             for i, k in enumerate(keys)}
    result = {"prompt": args.prompt, "subject": args.subject, "step": args.step,
              "mean_entropy_fraction": round(float(np.mean([r["entropy_fraction"] for r in rows])), 3),
              "inside_outside_ratio": {t: round(v, 2) for t, v in ratio.items()},
              "mean_inside": {k: round(float(np.mean([r["inside"][i] for r in rows])), 3) for i, k in enumerate(keys)},
              "mean_outside": {k: round(float(np.mean([r["outside"][i] for r in rows])), 3) for i, k in enumerate(keys)}}
    print("RESULT " + json.dumps(result))  # noqa: T201


if __name__ == "__main__":
    main()

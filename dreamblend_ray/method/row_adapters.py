"""One UNet call, a LoRA adapter per row: the base layers run once for the whole batch and each
LoRA'd layer adds its row's own low-rank delta (S-LoRA / Punica's idea, for the diffusers UNet).

This is peft's mixed-adapter batch (``LoraLayer._mixed_batch_forward``: the base layer on the whole
batch, then each adapter's ``B(A(x))`` on its rows' sub-batch), driven the way peft's own
``PeftModel`` drives it: a forward pre-hook hands ``adapter_names`` to every LoRA layer for the
duration of one call. The UNet's modules and attention processors are untouched, so attention
recording (``method/attention.py``) and the guidance gradient work as before: only rows whose
latents require grad carry gradient. A row named :data:`BASE` gets the base model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def lora_layers(unet) -> list[LoraLayer]:
    """The peft LoRA layers currently injected into ``unet`` (none before an adapter is loaded)."""
    return [module for module in unet.modules() if isinstance(module, LoraLayer)]


def check_adapters(unet, names: list[str]) -> None:
    """ValueError naming the adapters of ``names`` that are not loaded on ``unet``."""
    loaded = set(getattr(unet, "peft_config", None) or {})
    missing = sorted({name for name in names if name != BASE} - loaded)
    if missing:
        raise ValueError(f"adapters {missing} are not loaded on the UNet (loaded: {sorted(loaded)})")


METHODS = ("peft", "gather")


@contextmanager
def per_row(unet, names: list[str], method: str = "peft"):
    """Within the block, every call of ``unet`` applies adapter ``names[b]`` to row ``b``.

    ``names`` must have one entry per row of the UNet's input (under CFG: ``[uncond rows; cond
    rows]``, the same names twice). Rows named :data:`BASE` get the base model.
    method: "peft" (peft's mixed batch: per adapter, its rows' sub-batch through its A and B) or
    "gather" (Punica's: every row's A and B gathered into one batched matmul per layer, whatever
    the number of adapters; plain linear LoRA layers, the others fall back to peft's).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_adapters(unet, names)
    layers = lora_layers(unet)
    rows = list(names)
    bases = [BASE] * len(rows)
    handles = []

    def inject(_module, args, kwargs):
        kwargs["adapter_names"] = rows
        return args, kwargs

    def base_only(_module, args, kwargs):
        kwargs["adapter_names"] = bases
        return args, kwargs

    def add_delta(module, args, _kwargs, output):
        delta = gathered_delta(module, args[0], rows)
        return output if delta is None else output + delta.to(output.dtype)

    for layer in layers:
        if method == "gather" and gatherable(layer):
            handles.append(layer.register_forward_pre_hook(base_only, with_kwargs=True))
            handles.append(layer.register_forward_hook(add_delta, with_kwargs=True))
        else:
            handles.append(layer.register_forward_pre_hook(inject, with_kwargs=True))
    try:
        yield unet
    finally:
        for handle in handles:
            handle.remove()


def gatherable(layer) -> bool:
    """A plain (not DoRA, not merged) LoRA layer on an ``nn.Linear``."""
    return (isinstance(layer.get_base_layer(), torch.nn.Linear) and not layer.merged
            and not any(layer.use_dora.values()) and not getattr(layer, "lora_variant", None))


def gathered_delta(layer, x: torch.Tensor, names: list[str]) -> torch.Tensor | None:
    """Each row's LoRA delta ``scale_b * B_b A_b x_b`` as two batched matmuls: ``(rows, ..., out)``.

    The rows' adapters are stacked (rank-padded with zeros; a row without an adapter here gets a
    zero slot) and gathered per row, so the cost does not grow with the number of adapters.
    """
    unique = [name for name in dict.fromkeys(names) if name != BASE and name in layer.lora_A]
    if not unique:
        return None
    rank = max(layer.r[name] for name in unique)
    weight_a = layer.lora_A[unique[0]].weight
    a = weight_a.new_zeros(len(unique) + 1, rank, weight_a.shape[1])
    b = weight_a.new_zeros(len(unique) + 1, layer.lora_B[unique[0]].weight.shape[0], rank)
    for k, name in enumerate(unique):
        r = layer.r[name]
        a[k, :r] = layer.lora_A[name].weight
        b[k, :, :r] = layer.lora_B[name].weight * layer.scaling[name]
    slot = {name: k for k, name in enumerate(unique)}
    index = torch.tensor([slot.get(name, len(unique)) for name in names], device=a.device)
    rows = x.reshape(len(names), -1, x.shape[-1]).to(a.dtype)
    delta = torch.bmm(torch.bmm(rows, a[index].transpose(1, 2)), b[index].transpose(1, 2))
    return delta.reshape(*x.shape[:-1], delta.shape[-1])

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


@contextmanager
def per_row(unet, names: list[str]):
    """Within the block, every call of ``unet`` applies adapter ``names[b]`` to row ``b``.

    ``names`` must have one entry per row of the UNet's input (under CFG: ``[uncond rows; cond
    rows]``, the same names twice). Rows named :data:`BASE` get the base model.
    """
    check_adapters(unet, names)
    layers = lora_layers(unet)
    if not layers:  # no adapter loaded: every row is the base model already
        yield unet
        return
    rows = list(names)

    def inject(_module, args, kwargs):
        kwargs["adapter_names"] = rows
        return args, kwargs

    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers]
    try:
        yield unet
    finally:
        for handle in handles:
            handle.remove()

"""G and E: the guidance (early) and edit (late) models of one subject.

Two shapes, one interface: two LoRA adapters on one base UNet (switching adapters, one copy of
the weights), or two full UNets. ``pair.guidance()`` and ``pair.edit()`` are context managers
that activate the model and yield the UNet to call. A pair is not thread-safe: callers
serialise sampling calls per base UNet (the sampler and the Serve replica do).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from diffusers import UNet2DConditionModel


@dataclass
class AdapterPair:
    """G and E as two named peft adapters on one UNet."""

    unet: UNet2DConditionModel
    guidance_adapter: str
    edit_adapter: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        loaded = set(getattr(self.unet, "peft_config", {}) or {})
        missing = {self.guidance_adapter, self.edit_adapter} - loaded
        if missing:
            raise ValueError(f"adapters {sorted(missing)} are not loaded on the UNet "
                             f"(loaded: {sorted(loaded)})")

    @contextmanager
    def _active(self, name: str):
        self.unet.set_adapter(name)
        self.unet.requires_grad_(False)  # peft's set_adapter marks the adapter trainable again
        yield self.unet

    def guidance(self):
        return self._active(self.guidance_adapter)

    def edit(self):
        return self._active(self.edit_adapter)

    @property
    def identical(self) -> bool:
        return self.guidance_adapter == self.edit_adapter

    @property
    def unets(self) -> tuple[UNet2DConditionModel, ...]:
        return (self.unet,)


@dataclass
class TwoUNetPair:
    """G and E as two UNets (full fine-tunes, or the same UNet twice for plain sampling)."""

    guidance_unet: UNet2DConditionModel
    edit_unet: UNet2DConditionModel
    meta: dict = field(default_factory=dict)

    @contextmanager
    def guidance(self):
        yield self.guidance_unet

    @contextmanager
    def edit(self):
        yield self.edit_unet

    @property
    def identical(self) -> bool:
        return self.guidance_unet is self.edit_unet

    @property
    def unets(self) -> tuple[UNet2DConditionModel, ...]:
        return (self.guidance_unet,) if self.identical else (self.guidance_unet, self.edit_unet)


def single(unet: UNet2DConditionModel) -> TwoUNetPair:
    """A degenerate pair (G = E = ``unet``): DreamBlend reduces to plain sampling."""
    return TwoUNetPair(unet, unet)


@contextmanager
def adapters_disabled(unet: UNet2DConditionModel):
    """The base model's own predictions: peft adapters (if any) disabled for the duration."""
    if not getattr(unet, "peft_config", None):
        yield unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
